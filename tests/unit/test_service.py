"""Shared service plumbing: start-up that a stop signal interrupts, the HTTP server's bind."""

from __future__ import annotations

import asyncio
import socket

import pytest
from fastapi import FastAPI

from evcharging.common.service import HttpServer, Stopped, until_stopped, wait_first


async def test_until_stopped_cancels_start_up_when_stop_is_set() -> None:
    stop = asyncio.Event()
    started = asyncio.Event()
    cancelled = False

    async def slow_start() -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise

    async def set_stop() -> None:
        await started.wait()
        stop.set()

    setter = asyncio.create_task(set_stop())
    with pytest.raises(Stopped):
        await until_stopped(stop, slow_start())
    await setter
    assert cancelled


async def test_until_stopped_passes_results_and_errors_through() -> None:
    async def fail() -> None:
        raise OSError("port taken")

    async def answer() -> int:
        return 42

    with pytest.raises(OSError, match="port taken"):
        await until_stopped(asyncio.Event(), fail())
    assert await until_stopped(asyncio.Event(), answer()) == 42


async def test_http_server_reports_a_taken_port_as_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(FastAPI(), "127.0.0.1", port)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await server.start()
        await server.stop()


async def test_wait_first_returns_on_an_event_and_cancels_its_waiters() -> None:
    stop = asyncio.Event()
    forever = asyncio.create_task(asyncio.Event().wait())
    stop.set()
    assert await wait_first([stop], [forever]) == set()
    assert not forever.done()
    forever.cancel()


async def test_wait_first_returns_the_task_that_ended() -> None:
    async def die() -> None:
        raise RuntimeError("consumer broke")

    dying = asyncio.create_task(die())
    assert await wait_first([asyncio.Event()], [dying]) == {dying}
    assert isinstance(dying.exception(), RuntimeError)

"""Helpers of the HTTP safety tests: a client with a chosen peer address, the error shape,
and a request body streamed in chunks that counts how much of it was taken."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("192.0.2.7", 50000)  # TEST-NET-1: never a real peer
CHUNK = 64 * 1024


def client_for(app: FastAPI, peer: tuple[str, int] = LOOPBACK) -> httpx.AsyncClient:
    """A client of `app` whose requests come from `peer` (``request.client``)."""
    transport = httpx.ASGITransport(app, client=peer)
    return httpx.AsyncClient(transport=transport, base_url="http://service.test")


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is `status` with a JSON ``{"error": str, "code": code, ...}`` body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
    return body


class Stream:
    """A request body of `total` bytes sent in CHUNK-sized pieces, counting what was taken.

    Given to httpx without a length, it goes chunked.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.sent < self.total:
            size = min(CHUNK, self.total - self.sent)
            self.sent += size
            yield b" " * size

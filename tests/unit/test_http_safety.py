"""HTTP safety every service shares (evcharging.common.http, SPEC §5 "Safe defaults").

The body limit (413 before a large body is read whole), the loopback and exposure checks,
and the CP Engine's app under its access policy: the token when one is set, loopback-only
changes without one, no cross-origin or form posts, one error shape. The client's address
is set with ``httpx.ASGITransport(client=...)``. Central's side is in test_api_protection.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from pydantic import SecretStr

from evcharging.apps.ev_cp_e.engine import ChargingPoint
from evcharging.apps.ev_cp_e.health import create_health_app
from evcharging.common.http import (
    MAX_BODY,
    BodyLimit,
    GuardedRoute,
    check_exposure,
    is_loopback,
)
from evcharging.common.messages import CPState
from tests.unit.fakes import RecordingPublisher
from tests.unit.http_helpers import (
    AUTH,
    CHUNK,
    JSON,
    LOOPBACK,
    REMOTE,
    TOKEN,
    Stream,
    assert_error,
    client_for,
)


@pytest.fixture
async def cp() -> AsyncIterator[ChargingPoint]:
    point = ChargingPoint("CP-001", RecordingPublisher(), status_interval=60.0)
    await point.start()
    yield point
    await point.stop()


# ----------------------------------------------------------------------------- body limit


def body_app(handled: list[int]) -> FastAPI:
    """A bare app behind BodyLimit whose handler records the size of each body it read."""
    app = FastAPI()
    app.add_middleware(BodyLimit)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        handled.append(len(body))
        return {"size": len(body)}

    return app


async def test_a_body_of_exactly_the_limit_is_read() -> None:
    handled: list[int] = []
    async with client_for(body_app(handled)) as client:
        response = await client.post("/echo", content=b"x" * MAX_BODY)
        assert response.status_code == 200
        assert handled == [MAX_BODY]
        streamed = await client.post("/echo", content=Stream(MAX_BODY))
        assert streamed.json() == {"size": MAX_BODY}


async def test_a_declared_length_over_the_limit_is_413_before_the_app_runs() -> None:
    handled: list[int] = []
    stream = Stream(2 * MAX_BODY)
    async with client_for(body_app(handled)) as client:
        response = await client.post(
            "/echo", content=stream, headers={"content-length": str(2 * MAX_BODY)}
        )
    body = assert_error(response, 413, "too_large")
    assert str(MAX_BODY) in body["error"]
    assert handled == []
    assert stream.sent == 0  # not one byte of the body was read


async def test_a_chunked_body_over_the_limit_is_cut_at_the_limit() -> None:
    handled: list[int] = []
    stream = Stream(2 * MAX_BODY)  # no length: httpx sends it chunked
    async with client_for(body_app(handled)) as client:
        response = await client.post("/echo", content=stream)
    assert_error(response, 413, "too_large")
    assert handled == []  # the handler never got the body
    assert stream.sent == MAX_BODY + CHUNK  # the read stopped at the chunk past the limit


async def test_a_content_length_that_lies_low_is_counted_anyway() -> None:
    handled: list[int] = []
    stream = Stream(2 * MAX_BODY)
    async with client_for(body_app(handled)) as client:
        response = await client.post("/echo", content=stream, headers={"content-length": "10"})
    assert_error(response, 413, "too_large")
    assert handled == []
    assert stream.sent == MAX_BODY + CHUNK


@pytest.mark.parametrize("declared", ["not-a-number", "-1", ""])
async def test_an_unreadable_content_length_falls_back_to_counting(declared: str) -> None:
    handled: list[int] = []
    async with client_for(body_app(handled)) as client:
        response = await client.post(
            "/echo", content=Stream(2 * MAX_BODY), headers={"content-length": declared}
        )
    assert_error(response, 413, "too_large")
    assert handled == []


async def test_the_engine_refuses_a_large_fault_body(cp: ChargingPoint) -> None:
    async with client_for(create_health_app(cp)) as client:
        response = await client.post("/fault", content=Stream(2 * MAX_BODY), headers=JSON)
    assert_error(response, 413, "too_large")
    assert cp.state is CPState.ACTIVATED


# ----------------------------------------------------------------------------- peers


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        (None, False),
        ("192.0.2.7", False),
        ("10.0.0.1", False),
        ("::ffff:192.0.2.7", False),
        ("testclient", False),
        ("central.example", False),
        ("127.0.0.1.example", False),
    ],
)
def test_is_loopback(host: str | None, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize(
    ("host", "token", "allow_anonymous", "refused"),
    [
        ("127.0.0.1", None, False, False),
        ("localhost", None, False, False),
        ("::1", None, False, False),
        ("0.0.0.0", None, False, True),
        ("::", None, False, True),
        ("", None, False, True),
        ("192.0.2.7", None, False, True),
        ("central", None, False, True),
        ("0.0.0.0", "", False, True),
        ("0.0.0.0", SecretStr(""), False, True),
        ("0.0.0.0", "t", False, False),
        ("0.0.0.0", SecretStr("t"), False, False),
        ("0.0.0.0", None, True, False),
    ],
)
def test_check_exposure(
    host: str, token: str | SecretStr | None, allow_anonymous: bool, refused: bool
) -> None:
    problem = check_exposure(host, token, allow_anonymous)
    assert (problem is not None) is refused
    if problem is not None:
        assert "EVCHARGING_API_TOKEN" in problem and "--allow-anonymous" in problem


def test_check_exposure_names_the_services_variable() -> None:
    problem = check_exposure("0.0.0.0", None, False, env_name="CENTRAL_API_TOKEN")
    assert problem is not None
    assert "0.0.0.0" in problem
    assert "CENTRAL_API_TOKEN (or EVCHARGING_API_TOKEN)" in problem


# ----------------------------------------------------------------------------- the engine


async def test_engine_fault_needs_the_token_when_one_is_set(cp: ChargingPoint) -> None:
    async with client_for(create_health_app(cp, api_token=TOKEN)) as client:
        for path in ("/fault", "/recover"):
            response = await client.post(path)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
        assert cp.state is CPState.ACTIVATED
        assert (await client.get("/health")).status_code == 200  # reads stay open
        assert (await client.post("/fault", headers=AUTH)).status_code == 200
        assert cp.state is CPState.FAULT
        assert (await client.post("/recover", headers=AUTH)).status_code == 200
    assert cp.state is CPState.ACTIVATED


async def test_engine_without_a_token_takes_faults_from_loopback_only(
    cp: ChargingPoint,
) -> None:
    app = create_health_app(cp)
    async with client_for(app, REMOTE) as client:
        body = assert_error(await client.post("/fault"), 403, "forbidden")
        assert "CP_ENGINE_API_TOKEN" in body["error"]
        assert (await client.get("/health")).status_code == 200
    assert cp.state is CPState.ACTIVATED
    async with client_for(app, LOOPBACK) as client:
        assert (await client.post("/fault")).status_code == 200
    assert cp.state is CPState.FAULT


async def test_engine_allow_anonymous(cp: ChargingPoint) -> None:
    async with client_for(create_health_app(cp, allow_anonymous=True), REMOTE) as client:
        assert (await client.post("/fault")).status_code == 200
    assert cp.state is CPState.FAULT


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"", {"content-type": "application/x-www-form-urlencoded"}),
        (b"reason=x", {"content-type": "application/x-www-form-urlencoded"}),
        (b"", {"content-type": "multipart/form-data; boundary=x"}),
        (b'{"reason": "x"}', {"content-type": "text/plain"}),
        (b'{"reason": "x"}', {}),
    ],
    ids=["empty-form", "form", "multipart", "text-plain", "body-without-type"],
)
async def test_engine_takes_json_bodies_or_none(
    cp: ChargingPoint, content: bytes, headers: dict[str, str]
) -> None:
    async with client_for(create_health_app(cp)) as client:
        response = await client.post("/fault", content=content, headers=headers)
    assert_error(response, 415, "unsupported_media_type")
    assert cp.state is CPState.ACTIVATED


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"", {}),
        (b'{"reason": "x"}', JSON),
        (b'{"reason": "x"}', {"content-type": "application/json; charset=utf-8"}),
        (b'{"reason": "x"}', {"content-type": "application/merge-patch+json"}),
    ],
    ids=["nothing", "json", "json-charset", "json-suffix"],
)
async def test_engine_accepts_json_or_nothing(
    cp: ChargingPoint, content: bytes, headers: dict[str, str]
) -> None:
    async with client_for(create_health_app(cp)) as client:
        response = await client.post("/fault", content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert cp.state is CPState.FAULT


async def test_engine_refuses_cross_origin_faults(cp: ChargingPoint) -> None:
    async with client_for(create_health_app(cp)) as client:
        response = await client.post("/fault", headers={"Origin": "http://evil.example"})
    assert_error(response, 403, "forbidden")
    assert cp.state is CPState.ACTIVATED


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", "/nope", {}, 404, "not_found"),
        ("DELETE", "/health", {}, 405, "method_not_allowed"),
        ("GET", "/fault", {}, 405, "method_not_allowed"),
        ("POST", "/fault", {"content": b"{", "headers": JSON}, 422, "invalid_request"),
        ("POST", "/fault", {"json": {"reason": ""}}, 422, "invalid_request"),
        ("POST", "/fault", {"content": b"\xff\xfe", "headers": JSON}, 422, "invalid_request"),
        ("POST", "/recover", {}, 409, "not_allowed"),
    ],
)
async def test_engine_errors_have_the_one_shape(
    cp: ChargingPoint, method: str, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    async with client_for(create_health_app(cp)) as client:
        response = await client.request(method, path, **kwargs)
    body = assert_error(response, status, code)
    assert "detail" not in body
    if status == 409:
        assert body["state"] == "ACTIVATED"


def test_every_route_of_the_engine_is_guarded(cp: ChargingPoint) -> None:
    app = create_health_app(cp)
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} == {"/health", "/fault", "/recover"}
    assert all(isinstance(r, GuardedRoute) for r in routes)

"""Central's API in protected mode (SPEC §5 "Safe defaults"), over a real Controller.

Without a token only loopback clients may change anything (403 otherwise) unless
allow_anonymous; with one every change needs it (401); a browser page of another origin is
refused (403) either way; a body over 1 MiB gets 413 before it is read whole, also from a
real uvicorn server. The client's address is set with ``httpx.ASGITransport(client=...)``.
"""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute
from pydantic import SecretStr

from evcharging.apps.ev_central.api import create_api
from evcharging.apps.ev_central.controller import Controller
from evcharging.common.http import (
    GuardedRoute,
)
from evcharging.common.messages import CPRegistration
from tests.unit.http_helpers import (
    AUTH,
    LOOPBACK,
    REMOTE,
    TOKEN,
    assert_error,
    client_for,
)

# ----------------------------------------------------------------------------- Central


REGISTER = {"cp_id": "CP-001"}


@pytest.mark.parametrize("peer", [REMOTE, ("10.1.2.3", 1), ("::ffff:192.0.2.7", 1)])
async def test_without_a_token_remote_clients_may_read_but_not_change(
    controller: Controller, peer: tuple[str, int]
) -> None:
    async with client_for(create_api(controller), peer) as client:
        body = assert_error(await client.post("/cp/register", json=REGISTER), 403, "forbidden")
        assert "CENTRAL_API_TOKEN" in body["error"]
        assert (await client.get("/cp")).status_code == 200
        assert (await client.get("/health")).status_code == 200
    assert controller.cps == {}


@pytest.mark.parametrize("peer", [LOOPBACK, ("127.0.0.2", 1), ("::1", 1)])
async def test_without_a_token_loopback_clients_may_change(
    controller: Controller, peer: tuple[str, int]
) -> None:
    async with client_for(create_api(controller), peer) as client:
        assert (await client.post("/cp/register", json=REGISTER)).status_code == 200


async def test_allow_anonymous_accepts_changes_from_anyone(controller: Controller) -> None:
    async with client_for(create_api(controller, allow_anonymous=True), REMOTE) as client:
        assert (await client.post("/cp/register", json=REGISTER)).status_code == 200


async def test_with_a_token_remote_clients_need_it(controller: Controller) -> None:
    async with client_for(create_api(controller, api_token=SecretStr(TOKEN)), REMOTE) as client:
        assert_error(await client.post("/cp/register", json=REGISTER), 401, "unauthorized")
        response = await client.post("/cp/register", json=REGISTER, headers=AUTH)
        assert response.status_code == 200


async def test_with_a_token_loopback_clients_need_it_too(controller: Controller) -> None:
    async with client_for(create_api(controller, api_token=TOKEN)) as client:
        assert_error(await client.post("/cp/register", json=REGISTER), 401, "unauthorized")


async def test_the_trusted_peer_test_is_injectable(controller: Controller) -> None:
    api = create_api(controller, trusted_peer=lambda host: host == "testclient")
    async with client_for(api, ("testclient", 50000)) as client:
        assert (await client.post("/cp/register", json=REGISTER)).status_code == 200
    async with client_for(api, LOOPBACK) as client:
        assert_error(await client.post("/cp/register", json=REGISTER), 403, "forbidden")


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "http://service.test.evil.example", "http://service.test:8080",
     "https://service.test:8443", "null", "garbage"],
)
@pytest.mark.parametrize("token", [None, TOKEN])
async def test_cross_origin_changes_are_refused(
    controller: Controller, origin: str, token: str | None
) -> None:
    async with client_for(create_api(controller, api_token=token)) as client:
        response = await client.post(
            "/cp/register", json=REGISTER, headers={"Origin": origin, **AUTH}
        )
        assert_error(response, 403, "forbidden")
        # Reads are not changes: a page may not read them (no CORS), but they are answered.
        assert (await client.get("/cp", headers={"Origin": origin})).status_code == 200
    assert controller.cps == {}


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://service.test", "service.test"),
        ("http://SERVICE.test", "service.test:80"),
        ("https://service.test", "service.test:443"),
        ("http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://[::1]:8000", "[::1]:8000"),
    ],
)
async def test_same_origin_changes_are_accepted(
    controller: Controller, origin: str, host: str
) -> None:
    async with client_for(create_api(controller)) as client:
        response = await client.post(
            "/cp/register", json=REGISTER, headers={"Origin": origin, "Host": host}
        )
    assert response.status_code == 200, response.text


def test_every_mutating_route_of_central_is_guarded(controller: Controller) -> None:
    app = create_api(controller)
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    mutating = [r for r in routes if r.methods & {"POST", "PUT", "PATCH", "DELETE"}]
    assert {r.path for r in mutating} == {
        "/cp/register", "/cp/fault", "/cp/{cp_id}/stop", "/cp/{cp_id}/resume",
        "/cp/{cp_id}/monitor", "/fleet/register", "/fleet/monitor", "/sites/{site}/limit",
    }
    assert all(isinstance(r, GuardedRoute) for r in routes)


async def test_central_keeps_working_after_refusals(controller: Controller) -> None:
    """Refusals are answers, not failures: the app serves the next call as usual."""
    await controller.register(CPRegistration(cp_id="CP-001"))
    async with client_for(create_api(controller), REMOTE) as client:
        for _ in range(3):
            assert_error(await client.post("/cp/CP-001/stop"), 403, "forbidden")
        stats = (await client.get("/stats")).json()
    assert stats["http_errors"] == 3

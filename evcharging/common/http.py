"""HTTP safety every service's FastAPI app shares (SPEC §5, "Safe defaults").

Over 400 lines: the one place of every service's HTTP safety (body limit, protected
mode, the error shape), kept together so that no service can take half of it.

* :class:`BodyLimit`: an ASGI middleware that answers 413 to a body over :data:`MAX_BODY`
  before it is read whole. It refuses a too large ``Content-Length`` at once, and counts
  the bytes of a streamed (chunked) or under-declared body, stopping the read at the limit.
* :class:`AccessPolicy`: who may make a mutating call (POST, PUT, PATCH, DELETE). With a
  token, every such call needs ``Authorization: Bearer <token>``. Without one, only loopback
  clients may make them (protected mode, as Redis has it), unless ``allow_anonymous``.
  Either way a browser request from another origin is refused, so a web page cannot make
  the operator's browser change anything. :class:`GuardedRoute` applies the policy in
  ``app.state.access`` before FastAPI reads the body. With a throttle
  (:class:`~evcharging.common.throttle.AuthThrottle`), an address that failed the token
  20 times within 10 s gets 429 (with ``Retry-After``) for 10 s, before its token is read.
* :func:`check_exposure`: the start-up check that refuses to listen on a non-loopback
  address with no token, unless ``--allow-anonymous`` is given.
* One error shape, ``{"error": "...", "code": "...", ...}`` (:class:`ErrorOut`), answered at
  one place by :func:`install_error_handlers`.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from loguru import logger
from pydantic import BaseModel, Field, SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from evcharging.common.config import SHARED_TOKEN_ENV
from evcharging.common.throttle import AuthThrottle

__all__ = [
    "MAX_BODY",
    "MUTATING_METHODS",
    "AccessPolicy",
    "BodyLimit",
    "ErrorDetail",
    "ErrorOut",
    "GuardedRoute",
    "HttpError",
    "check_exposure",
    "error_response",
    "install_error_handlers",
    "is_cross_origin",
    "is_loopback",
    "token_matches",
]

MAX_BODY = 1 << 20
"""The largest request body any service reads (1 MiB); a larger one gets 413."""

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}
"""The ``code`` of an error by its status, for the errors Starlette/FastAPI raise themselves."""

ErrorHook = Callable[[Request, int, str, str], None]
"""Called for every error answered: request, status, code and message (logging, counters)."""

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


# ---------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    """One problem of an invalid request: where (``["body", "cp_id"]``) and what."""

    loc: list[str]
    msg: str


class ErrorOut(BaseModel):
    """Every error answer of every service: a message for people and a code for programs."""

    error: str = Field(description="what went wrong, for people")
    code: str = Field(
        description="what went wrong, for programs: invalid_request, unauthorized, forbidden, "
        "not_found, method_not_allowed, not_allowed, too_large, unsupported_media_type, "
        "too_many_requests, too_many_cps, unknown_cp, unavailable, internal"
    )
    details: list[ErrorDetail] | None = Field(
        None, description="the invalid fields of a 422, when there are some"
    )


class HttpError(Exception):
    """An error answered as ``{"error": message, "code": code}`` with `status`."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "code": code, **extra}, status_code=status, headers=headers
    )


def _log_error(request: Request, status: int, code: str, message: str) -> None:
    logger.info("{} {} -> {} {} {}", request.method, request.url.path, status, code, message)


def engine_app(
    title: str,
    description: str,
    *,
    api_token: SecretStr | str | None,
    allow_anonymous: bool,
    trusted_peer: Callable[[str | None], bool],
) -> FastAPI:
    """The app of a CP's own HTTP port (an engine's or a fleet's): no API docs, every
    route guarded by protected mode with the engine's token (`CP_ENGINE_API_TOKEN`), JSON
    or no body on changes (a cross-site form cannot fault a CP), the 1 MiB body limit and
    the one error shape."""
    app = FastAPI(title=title, description=description, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.router.route_class = GuardedRoute  # every route checks app.state.access first
    app.state.access = AccessPolicy.of(
        api_token, allow_anonymous=allow_anonymous, require_json=True,
        trusted_peer=trusted_peer, env_name="CP_ENGINE_API_TOKEN",
    )
    app.add_middleware(BodyLimit)
    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI, on_error: ErrorHook = _log_error) -> None:
    """Answer every error of `app` as :class:`ErrorOut`, calling `on_error` for each.

    :class:`HttpError` carries its status; request validation and a body that is not UTF-8
    JSON give 422 (FastAPI's own 400 "error parsing the body" is as invalid as any other
    body); Starlette's errors (404, 405 with ``Allow``) keep their status. Anything else is
    logged with its traceback and answered 500 ``internal``, without its text.
    """

    def answer(
        request: Request,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> JSONResponse:
        on_error(request, status, code, str(extra.get("details") or message))
        return error_response(status, code, message, headers=headers, **extra)

    @app.exception_handler(HttpError)
    async def http_error(request: Request, exc: HttpError) -> JSONResponse:
        return answer(request, exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
            for err in exc.errors()
        ]
        return answer(request, 422, "invalid_request", "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's "There was an error parsing the body": not UTF-8, nested too deep,
            # a number too long to convert. It is as invalid as any other body: 422.
            details = [{"loc": ["body"], "msg": "body is not valid UTF-8 JSON"}]
            return answer(request, 422, "invalid_request", "invalid request", details=details)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return answer(request, exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error("{} {} failed", request.method, request.url.path)
        return answer(request, 500, "internal", "internal error")


# ---------------------------------------------------------------------------- body size


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a body passes the limit; :class:`BodyLimit` answers 413."""


class BodyLimit:
    """ASGI middleware: 413 ``too_large`` for a request body over `max_body` bytes.

    A ``Content-Length`` over the limit is answered before the app runs. Otherwise every
    chunk the app receives is counted (a chunked body has no length; a declared one may
    lie), and the chunk that passes the limit ends the read: the app gets an exception
    instead of it, whatever it answers is dropped, and the client gets the 413. At most
    one chunk past the limit is ever held in memory.
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_body:
            await self._refuse(send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a body it could not read; the 413 replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send)
        elif exceeded:
            logger.warning("request body over {} bytes after the answer started", self.max_body)

    async def _refuse(self, send: Send) -> None:
        response = error_response(
            413, "too_large", f"request body too large (at most {self.max_body} bytes)",
            headers={"Connection": "close"},
        )
        await send({
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        })
        await send({"type": "http.response.body", "body": response.body})


def _declared_length(scope: Scope) -> int:
    """The largest valid ``Content-Length`` of the request, 0 when none (the count decides)."""
    declared = 0
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                declared = max(declared, int(value))
            except ValueError:
                continue
    return declared


# ---------------------------------------------------------------------------- peers


def is_loopback(host: str | None) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1, ::ffff:127.x) or localhost."""
    if not host:
        return False
    text = host.strip().removeprefix("[").removesuffix("]")
    if text.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _token_text(token: SecretStr | str | None) -> str | None:
    text = token.get_secret_value() if isinstance(token, SecretStr) else token
    return text or None


def check_exposure(
    host: str,
    token: SecretStr | str | None,
    allow_anonymous: bool,
    *,
    env_name: str = SHARED_TOKEN_ENV,
) -> str | None:
    """Why listening on `host` is refused, or None when it is fine.

    Binding anything but a loopback address with no token is refused unless
    `allow_anonymous`: the service would take changes from anyone who can reach it.
    """
    if _token_text(token) is not None or allow_anonymous or is_loopback(host):
        return None
    where = host or "every address"
    return (
        f"refusing to listen on {where} without an API token: anyone who can reach it "
        f"could change the system. Set {_token_names(env_name)}, "
        "listen on 127.0.0.1, or pass --allow-anonymous to accept anonymous changes"
    )


def _token_names(env_name: str) -> str:
    return env_name if env_name == SHARED_TOKEN_ENV else f"{env_name} (or {SHARED_TOKEN_ENV})"


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <token>`` (scheme case-insensitive).

    Compared as bytes: ``hmac.compare_digest`` refuses non-ASCII ``str``, and Starlette
    decodes header values as latin-1, which gives the bytes back unchanged.
    """
    if authorization is None:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    try:
        presented = credentials.strip().encode("latin-1")
    except UnicodeEncodeError:  # not a header value Starlette could have produced
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, token.encode())


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit(f"//{netloc}")
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def is_cross_origin(connection: HTTPConnection) -> bool:
    """Whether a browser sent this request from a page of another origin.

    A browser names the page's origin in ``Origin`` on every POST and every WebSocket
    handshake; a request without one (curl, the monitor, another service) is not a
    browser's cross-origin request. The origin's host and port must match the ``Host`` the
    client asked for (a port left out is the scheme's default). The scheme itself is not
    compared: a TLS proxy in front of the service changes it.
    """
    origin = connection.headers.get("origin")
    if origin is None:
        return False
    parts = urlsplit(origin)
    if not parts.scheme or not parts.netloc:
        return True  # "null" (a sandboxed page, a file) or garbage
    host = connection.headers.get("host", "")
    return _host_port(parts.netloc, parts.scheme) != _host_port(host, parts.scheme)


# ---------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class AccessPolicy:
    """Who may make a mutating call; reads are open to every client.

    `token`: when set, every mutating call needs ``Authorization: Bearer <token>``.
    Without it, mutating calls come from clients `trusted_peer` accepts (loopback) only,
    unless `allow_anonymous`. A cross-origin browser request is refused either way.
    With `require_json`, a mutating call's body is JSON or absent: a form post is refused
    (415) even when empty. With a `throttle` and a token, a client address the throttle
    has blocked gets 429 before its token is looked at, and each wrong or missing token
    counts as a failure of its address.
    """

    token: str | None = None
    allow_anonymous: bool = False
    require_json: bool = False
    trusted_peer: Callable[[str | None], bool] = field(default=is_loopback)
    env_name: str = SHARED_TOKEN_ENV
    throttle: AuthThrottle | None = field(default=None, compare=False)

    @classmethod
    def of(
        cls,
        token: SecretStr | str | None,
        *,
        allow_anonymous: bool = False,
        require_json: bool = False,
        trusted_peer: Callable[[str | None], bool] = is_loopback,
        env_name: str = SHARED_TOKEN_ENV,
        throttle: AuthThrottle | None = None,
    ) -> AccessPolicy:
        """A policy from a settings token (a ``SecretStr``, a string, empty or None)."""
        return cls(
            _token_text(token), allow_anonymous, require_json, trusted_peer, env_name,
            throttle,
        )

    def check(self, request: HTTPConnection, method: str) -> None:
        """Raise :class:`HttpError` when `request` may not make a call of `method`."""
        if method.upper() not in MUTATING_METHODS:
            return
        if is_cross_origin(request):
            raise HttpError(403, "forbidden", "cross-origin request refused")
        if self.token is not None:
            address = request.client.host if request.client else None
            throttle = self.throttle
            if throttle is not None and address:
                wait = throttle.retry_after(address)
                if wait > 0:
                    raise HttpError(
                        429, "too_many_requests",
                        "too many failed authentications from this address: try again in "
                        f"{math.ceil(wait)}s",
                        headers={"Retry-After": str(math.ceil(wait))},
                    )
            if not token_matches(request.headers.get("authorization"), self.token):
                if throttle is not None and address and throttle.failed(address):
                    logger.warning("client {} failed authentication {} times within {:g}s: "
                                   "refused (429) for {:g}s", address, throttle.failures,
                                   throttle.window, throttle.block)
                raise HttpError(
                    401, "unauthorized",
                    "missing or wrong API token (Authorization: Bearer <token>)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        elif not self.allow_anonymous:
            peer = request.client.host if request.client else None
            if not self.trusted_peer(peer):
                raise HttpError(
                    403, "forbidden",
                    "protected mode: without an API token changes are accepted from this "
                    f"machine (loopback) only; set {_token_names(self.env_name)} on the service "
                    "and send it as Authorization: Bearer <token>",
                )
        if self.require_json:
            _require_json_or_nothing(request)


def _require_json_or_nothing(request: HTTPConnection) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        length = request.headers.get("content-length")
        has_body = (length is not None and length.strip() != "0") or (
            "transfer-encoding" in request.headers
        )
        if not has_body:
            return
    else:
        media = content_type.partition(";")[0].strip().lower()
        if media == "application/json" or (
            media.startswith("application/") and media.endswith("+json")
        ):
            return
    raise HttpError(
        415, "unsupported_media_type",
        "the body must be JSON (Content-Type: application/json) or absent",
    )


class GuardedRoute(APIRoute):
    """A route that checks ``app.state.access`` (an :class:`AccessPolicy`) before FastAPI
    reads and validates the body.

    A FastAPI dependency would run only after the body is parsed, so an unauthenticated
    caller with a malformed body would get 422 (and learn the schema) instead of 401, and
    a large body would be read before the caller is refused.
    """

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            policy: AccessPolicy = request.app.state.access
            policy.check(request, request.method)
            return await handler(request)

        return guarded

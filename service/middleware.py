"""ASGI middleware of the app's own: request ids, the request body size limit and the body
timeout."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import error_response

logger = logging.getLogger("service.requests")
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestId:
    """Echo the client's X-Request-Id (or make one) on every response, keep it in the
    request's state (`request.state.request_id`) and log it with the request's outcome."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logger.info(
                "request %s %s %s -> %s in %.1f ms",
                request_id,
                scope["method"],
                scope["path"],
                status,
                1000 * (time.perf_counter() - started),
            )


def request_id(request) -> str:
    """The id RequestId gave this request (a fresh one outside the middleware)."""
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not they declare a length."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._refuse(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(
            413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large"
        )
        await response(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so that FastAPI's body parsing re-raises it as it is (it turns any
    other exception raised while reading the body into a 400)."""


class BodyTimeout:
    """Answer 408 (and close the connection) when a request body has not fully arrived
    `seconds` after the request began: a client that stalls mid-body holds nothing longer.

    Only the body is timed; once it is complete, waiting on `receive` (for a disconnect,
    while a long generation runs) is as patient as the client."""

    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _BodyTimedOut(
                    408,
                    f"the request body did not arrive within {self.seconds:g} seconds",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        try:
            await self.app(scope, timed_receive, send)
        except _BodyTimedOut as exc:  # raised outside FastAPI's handlers (not seen so far)
            response = error_response(
                408, str(exc.detail), code="request_timeout", headers=exc.headers
            )
            await response(scope, receive, send)


class _BodyTimedOut(StarletteHTTPException):
    """An HTTPException for the same reason as `_BodyTooLarge`."""

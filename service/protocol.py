"""uvicorn's HTTP protocol with a deadline on a connection's first request headers.

uvicorn times idle keep-alive connections but not a new one that never finishes its
headers; such a client would hold a connection (and a `--limit-concurrency` slot) for as
long as it likes. This closes it after `header_timeout` seconds.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def with_header_timeout(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's protocol class (httptools or h11), closing a connection whose first request
    has not got its headers through within `seconds`."""

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_deadline = self.loop.call_later(seconds, self._headers_too_slow)

        def connection_lost(self, exc) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            # Both protocols set `cycle` once a request's headers are complete.
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol

"""uvicorn's httptools connection with what it lacks for facing the internet: a limit on the bytes
of a request's headers (uvicorn has one only for h11) and on the time they may take to arrive
(uvicorn times out only idle keep-alive connections). Refusals are our JSON errors (431 / 408),
then the connection closes."""
from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import ApiError

MAX_HEADER_BYTES = 64 * 1024       # request line + headers (a browser sends 1-8 KB)
MAX_HEADERS = 100                  # header lines (app.py checks the count)
HEADER_SECONDS = 10.0              # from the connection (or the request's first byte) to its last header


def header_limits() -> dict:
    return {"limit_kb": MAX_HEADER_BYTES // 1024, "count": MAX_HEADERS, "limit": HEADER_SECONDS}


class BoundedHttp(HttpToolsProtocol):
    header_timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.await_headers()

    def await_headers(self):
        self.header_bytes = 0
        self.header_timer = self.loop.call_later(HEADER_SECONDS, self.refuse, 408, "header_timeout")

    def on_message_begin(self):
        super().on_message_begin()
        if self.header_timer is None:
            self.await_headers()

    def on_headers_complete(self):
        self.stop_timer()
        super().on_headers_complete()

    def data_received(self, data: bytes):
        super().data_received(data)
        if self.header_timer is not None and not self.transport.is_closing():   # still in the headers
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES:
                self.refuse(431, "header_too_large")

    def connection_lost(self, exc):
        self.stop_timer()
        super().connection_lost(exc)

    def stop_timer(self):
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def refuse(self, status: int, code: str):
        self.stop_timer()
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return                            # an answer is on its way: the next request waits its turn
        body = json.dumps(ApiError(status, code, **header_limits()).payload("zh"),
                          ensure_ascii=False).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, reason, len(body)) + body)
        self.transport.close()

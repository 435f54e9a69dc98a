"""Remote images (only with --allow-remote-images): one download with a total deadline (not a
timeout per read), a few redirects at most, each only to http(s) and never to a loopback, private
or link-local address. Every failure is the same `Refused`, so an answer repeats nothing the
target said and the server cannot be used as a port scanner."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 3
DEADLINE = 10.0                    # seconds for the whole download, redirects included
REDIRECTS = (301, 302, 303, 307, 308)


class Refused(Exception):
    """The download failed, for whatever reason (deliberately not said)."""


def public(host: str, port: int) -> bool:
    """Whether every address `host` resolves to is a global one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_global for info in infos)


def download(url: str, limit: int, seconds: float = DEADLINE) -> bytes:
    """The body at `url`, at most limit + 1 bytes, within `seconds` in all; else Refused. The
    first URL is the client's choice (the operator enabled remote images); a redirect must lead
    to a public http(s) address."""
    end = time.monotonic() + seconds
    for hop in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused
        if hop and not public(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)):
            raise Refused
        data, location = get_once(parts, limit, end)
        if location is None:
            return data
        url = urljoin(url, location)
    raise Refused


def get_once(parts, limit: int, end: float) -> tuple[bytes, str | None]:
    """(body, None) or (b"", the redirect's Location). A timer shuts the socket at `end`, so a
    target that trickles a byte every few seconds cannot hold the thread past the deadline."""
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise Refused
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=remaining)
    timer = None
    try:
        conn.connect()                       # the socket is kept: http.client may drop conn.sock
        timer = threading.Timer(end - time.monotonic(), cut, (conn.sock,))
        timer.start()
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": "vlm-serve"})
        r = conn.getresponse()
        if r.status in REDIRECTS and r.getheader("location"):
            return b"", r.getheader("location")
        if r.status != 200:
            raise Refused
        chunks, size = [], 0
        while size <= limit and (chunk := r.read1(65536)):
            chunks.append(chunk)
            size += len(chunk)
        if time.monotonic() >= end:          # cut short by the timer: not the whole file
            raise Refused
        return b"".join(chunks), None
    except (OSError, http.client.HTTPException, ValueError):
        raise Refused from None
    finally:
        if timer is not None:
            timer.cancel()
        conn.close()


def cut(sock: socket.socket):
    """Wake a read blocked on the socket (close() alone would not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

"""`mlx-sd-studio`: a local web page for runs (live curves, validation timeline) and blind A/B votes.

    mlx-sd-studio runs/shoes runs/shoes-r16 generated/base generated/lora

Starlette app served by uvicorn on 127.0.0.1 (default port 8765). Pages: /runs, /timeline, /ab; the
browser draws charts from JSON (plain SVG, nothing fetched from the internet). Only image files under
the given folders are served: relative paths without `..`, resolved through symlinks and checked to stay
inside. Binding to another address (`--host`) prints a token that every request must carry (the first
visit's `?token=` sets a cookie). Votes go to an SQLite file (`--db`), see `mlx_sd.studio.votes`.
"""

from __future__ import annotations

import argparse
import errno
import hmac
import ipaddress
import secrets
import socket
import sqlite3
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

from .sources import (
    StudioError,
)

LOOPBACK = ("127.0.0.1", "localhost")
COOKIE = "studio_token"


class TokenGate:
    """ASGI middleware: every request carries the token (query `token`, header X-Studio-Token or cookie)."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cookie = SimpleCookie(headers.get("cookie", ""))
        given = query or headers.get("x-studio-token") or (cookie[COOKIE].value if COOKIE in cookie else "")
        if not hmac.compare_digest(given.encode(), self.token):
            body = b"401: this studio needs its token; open the address with ?token= that mlx-sd-studio printed"
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        if not query:
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                value = f"{COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", value)]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


async def _refuse(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before it is read.

    A declared Content-Length over the limit is refused at once (nothing of it is read, so a 10 GB
    header holds nothing open); a body without one (chunked) is read up to the limit and refused there.
    The body read is handed on to the app, which then never waits on the network for it.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        if declared is not None and not (declared.isdigit() and int(declared) <= self.limit):
            if not declared.isdigit():
                return await _refuse(send, 400, "400: bad Content-Length")
            return await _refuse(send, 413, f"413: request bodies are limited to {self.limit} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _refuse(send, 413, f"413: request bodies are limited to {self.limit} bytes")
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as the server's own receive does

        return await self.app(scope, replay, send)


def create_app(folders: list[str | Path], db: str | Path, token: str | None = None, trusted_hosts=LOOPBACK):
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from .app import MAX_BODY, Studio

    studio = Studio(folders, db)
    middleware = [Middleware(BodyLimit, limit=MAX_BODY),
                  Middleware(TrustedHostMiddleware, allowed_hosts=list(trusted_hosts))]
    if token:
        middleware.insert(0, Middleware(TokenGate, token=token))
    app = Starlette(routes=studio.routes(), middleware=middleware)
    app.state.store = studio.store
    return app


def reachable_addresses(family: int) -> list[str]:
    """Addresses other machines may use to reach this one: the host name's and the default route's.

    The default route's address is found by connecting a UDP socket, which sends nothing.
    """
    found: list[str] = []
    try:
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM)]
    except OSError:
        pass
    for probe in (("2001:db8::1",) if family == socket.AF_INET6 else ("192.0.2.1", "10.255.255.255")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                u.connect((probe, 9))
                found.append(u.getsockname()[0])
        except OSError:
            pass
    out = []
    for a in found:
        ip = ipaddress.ip_address(a.split("%")[0])
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified) and a not in out:
            out.append(a)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlx-sd-studio", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("folders", nargs="+", metavar="RUN_DIR",
                    help="train.py --output_dir folders (or a folder of them), "
                         "or folders of images with a captions.json")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind; any other than 127.0.0.1/localhost requires the printed token")
    ap.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    ap.add_argument("--db", default=argparse.SUPPRESS,
                    help="SQLite file for votes (default: studio_votes.sqlite in the first folder)")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print("error: the studio needs its extra: pip install 'mlx-sd-lora[studio]' (starlette, uvicorn)",
              file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    local = args.host in LOOPBACK
    token = None if local else secrets.token_urlsafe(24)
    db = Path(getattr(args, "db", None) or Path(args.folders[0]) / "studio_votes.sqlite").expanduser()
    try:
        app = create_app(args.folders, db, token, LOOPBACK if local else ("*",))
        bind_host = "127.0.0.1" if local else args.host  # "localhost" may resolve to ::1 first
        family, kind, _, _, addr = socket.getaddrinfo(bind_host, args.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise OSError(f"port {args.port} on {bind_host} is already in use (another mlx-sd-studio?); "
                              "choose another with --port N, or --port 0 for any free one") from None
            if e.errno == errno.EACCES:
                raise OSError(f"port {args.port} needs administrator rights; choose one above 1023 with --port N") \
                    from None
            raise OSError(f"cannot listen on {bind_host}:{args.port}: {e.strerror or e}") from None
        sock.listen(128)  # connections queue from now on, so the printed address works at once
    except (StudioError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except sqlite3.Error as e:
        print(f"error: vote database {db}: {e}; choose another file with --db", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    # A wildcard address (0.0.0.0, ::) is where the server listens, not an address a browser can open.
    wildcard = ipaddress.ip_address(host.split("%")[0]).is_unspecified
    hosts = reachable_addresses(family) if wildcard else [host]
    if wildcard and not hosts:
        print("no address of this machine that others can reach was found (no network?)", flush=True)
        hosts = ["::1" if family == socket.AF_INET6 else "127.0.0.1"]
    print(f"mlx-sd-studio: {len(args.folders)} folder(s), votes in {db}", flush=True)
    if token:
        print("bound to a non-loopback address: every request must carry this token", flush=True)
    if wildcard:
        print(f"listening on every address of this machine ({host}); from another machine open one of:", flush=True)
    for h in hosts:
        shown_host = f"[{h}]" if ":" in h else h
        print(f"open http://{shown_host}:{port}/" + (f"?token={token}" if token else ""), flush=True)
    if wildcard:
        loop = "[::1]" if family == socket.AF_INET6 else "127.0.0.1"
        print(f"on this machine: http://{loop}:{port}/" + (f"?token={token}" if token else ""), flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

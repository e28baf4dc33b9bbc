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
import hmac
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


def create_app(folders: list[str | Path], db: str | Path, token: str | None = None, trusted_hosts=LOOPBACK):
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from .app import Studio

    studio = Studio(folders, db)
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(trusted_hosts))]
    if token:
        middleware.insert(0, Middleware(TokenGate, token=token))
    app = Starlette(routes=studio.routes(), middleware=middleware)
    app.state.store = studio.store
    return app


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
        sock.bind(addr)
        sock.listen(128)  # connections queue from now on, so the printed address works at once
    except (StudioError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except sqlite3.Error as e:
        print(f"error: vote database {db}: {e}; choose another file with --db", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}/" + (f"?token={token}" if token else "")
    print(f"mlx-sd-studio: {len(args.folders)} folder(s), votes in {db}", flush=True)
    if token:
        print("bound to a non-loopback address: every request must carry this token", flush=True)
    print(f"open {url}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

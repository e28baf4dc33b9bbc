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
import hashlib
import hmac
import re
import secrets
import socket
import sqlite3
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, quote

from .sources import (
    IMAGE_SUFFIXES,
    Catalog,
    MetricsTail,
    StudioError,
    metrics_files,
    open_roots,
    run_config,
    safe_path,
    validation_images,
    validation_prompts,
)
from .votes import VoteStore

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost")
SIDES = ("left", "right")
ANSWER_KEYS = ("left", "right", "tie", "both_bad")
NONCE_RE = re.compile(r"^[0-9a-f]{16}$")
COOKIE = "studio_token"
PAGE_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"


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


def placement(secret: bytes, pair: str, nonce: str) -> str:
    """'AB' (source A on the left) or 'BA', decided by the server's secret: the page cannot tell which."""
    return "AB" if hmac.new(secret, f"{pair}|{nonce}".encode(), hashlib.sha256).digest()[0] & 1 == 0 else "BA"


def create_app(folders: list[str | Path], db: str | Path, token: str | None = None, trusted_hosts=LOOPBACK):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    roots = open_roots(folders)
    catalog = Catalog(roots)
    store = VoteStore(db)
    secret = store.secret()
    tails: dict[str, MetricsTail] = {}

    def bad(msg: str, status: int = 400):
        return JSONResponse({"error": msg}, status_code=status)

    def root_of(root_id: str):
        root = catalog.roots.get(root_id)
        if root is None:
            raise HTTPException(404, f"no folder {root_id!r}")
        return root

    def serve(root, rel: str):
        try:
            path = safe_path(root.path, rel)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        except PermissionError as e:
            raise HTTPException(403, str(e)) from None
        except FileNotFoundError:
            raise HTTPException(404, "no such image") from None
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise HTTPException(404, "only images are served")
        return FileResponse(path)

    def file_url(root_id: str, rel: str) -> str:
        return f"/files/{root_id}/{quote(rel)}"

    def page(name: str):
        async def handler(request: Request):
            return FileResponse(STATIC / f"{name}.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                                  "Cache-Control": "no-store"})
        return handler

    async def files(request: Request):
        return serve(root_of(request.path_params["root"]), request.path_params["path"])

    async def api_roots(request: Request):
        return JSONResponse([{"id": r.id, "name": r.name, "path": str(r.path), "is_run": r.is_run,
                              "has_captions": r.has_captions, "validation": bool(validation_images(r))}
                             for r in roots])

    async def api_runs(request: Request):
        out = []
        for r in roots:
            for label, path in metrics_files(r):
                run_id = f"{r.id}/{label}"
                tails.setdefault(run_id, MetricsTail(path))
                out.append({"id": run_id, "root": r.name, "label": label, "name": f"{r.name} {label}"})
        return JSONResponse(out)

    async def api_metrics(request: Request):
        run_id = request.query_params.get("run", "")
        if run_id not in tails:
            await api_runs(request)  # a resumed run may have started a new logs/<time>/ since
        tail = tails.get(run_id)
        if tail is None:
            return bad(f"unknown run {run_id!r}", 404)
        try:
            start = max(0, int(request.query_params.get("from", "0")))
        except ValueError:
            return bad("from must be an integer")
        recs = tail.refresh()
        return JSONResponse({"run": run_id, "from": start, "total": len(recs), "records": recs[start:],
                             "bad_lines": tail.bad_lines}, headers={"Cache-Control": "no-store"})

    async def api_timeline(request: Request):
        root = root_of(request.query_params.get("root", ""))
        images = validation_images(root)
        prompts = validation_prompts(run_config(root)) if images else []
        return JSONResponse({
            "root": root.id, "name": root.name, "prompts": prompts,
            "steps": sorted({v.step for v in images}),
            "images": [{"epoch": v.epoch, "step": v.step, "prompt": v.prompt, "image": v.image,
                        "url": file_url(root.id, v.rel)} for v in images]}, headers={"Cache-Control": "no-store"})

    async def api_sources(request: Request):
        try:
            return JSONResponse([{"id": s.id, "name": s.name, "kind": s.kind, "count": len(s.items)}
                                 for s in catalog.sources()])
        except StudioError as e:
            return bad(str(e), 500)

    def pair_context(a_id: str, b_id: str):
        a, b = catalog.source(a_id), catalog.source(b_id)
        if a is None or b is None:
            raise HTTPException(400, f"unknown source {a_id if a is None else b_id!r}")
        if a.id == b.id:
            raise HTTPException(400, "choose two different sources")
        return a, b, {p.id: p for p in catalog.pairs(a, b)}

    async def api_next(request: Request):
        q = request.query_params
        a, b, pairs = pair_context(q.get("a", ""), q.get("b", ""))
        if not pairs:
            return JSONResponse({"pair": None, "total": 0,
                                 "reason": f"{a.name} and {b.name} share no image with the same prompt and seed"})
        counts = store.rater_counts(q.get("rater", "").strip(), list(pairs))
        least = min(counts.values())
        pid = secrets.choice(sorted(p for p, c in counts.items() if c == least))
        nonce = secrets.token_hex(8)
        pair = pairs[pid]
        base = f"/api/ab/image?a={quote(a.id)}&b={quote(b.id)}&pair={pid}&nonce={nonce}&side="
        return JSONResponse({"pair": pid, "nonce": nonce, "prompt": pair.a.prompt, "seed": pair.a.seed,
                             "left": base + "left", "right": base + "right", "total": len(pairs),
                             "rated": sum(1 for c in counts.values() if c > 0)}, headers={"Cache-Control": "no-store"})

    async def api_image(request: Request):
        q = request.query_params
        _, _, pairs = pair_context(q.get("a", ""), q.get("b", ""))
        pair, nonce, side = pairs.get(q.get("pair", "")), q.get("nonce", ""), q.get("side", "")
        if pair is None or not NONCE_RE.match(nonce) or side not in SIDES:
            raise HTTPException(400, "unknown pair, bad nonce or side")
        first = pair.a if placement(secret, pair.id, nonce) == "AB" else pair.b
        item = first if side == "left" else (pair.b if first is pair.a else pair.a)
        return serve(root_of(item.root), item.rel)

    async def api_vote(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return bad("send the vote as application/json", 415)
        try:
            body = await request.json()
        except ValueError:
            return bad("the body is not JSON")
        if not isinstance(body, dict):
            return bad("the body must be a JSON object")
        answer, rater, nonce = body.get("answer"), body.get("rater"), body.get("nonce")
        if answer not in ANSWER_KEYS:
            return bad(f"answer must be one of {', '.join(ANSWER_KEYS)}")
        if not isinstance(rater, str) or not rater.strip() or len(rater) > 64:
            return bad("give a rater name (1-64 characters)")
        if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
            return bad("bad nonce")
        try:
            a, b, pairs = pair_context(str(body.get("a", "")), str(body.get("b", "")))
        except HTTPException as e:
            return bad(e.detail)
        pair = pairs.get(body.get("pair"))
        if pair is None:
            return bad(f"unknown pair id {body.get('pair')!r} for {a.name} vs {b.name}")
        shown = placement(secret, pair.id, nonce)
        if answer in SIDES:
            answer = "A" if (answer == "left") == (shown == "AB") else "B"
        vote_id = store.add(rater=rater.strip(), source_a=a.name, source_b=b.name,
                            image_a=str(catalog.roots[pair.a.root].path / pair.a.rel),
                            image_b=str(catalog.roots[pair.b.root].path / pair.b.rel),
                            prompt=pair.a.prompt, seed=pair.a.seed, pair_id=pair.id, shown=shown, answer=answer)
        names = (a.name, b.name) if shown == "AB" else (b.name, a.name)
        return JSONResponse({"id": vote_id, "answer": answer, "left": names[0], "right": names[1],
                             "votes": store.count()})

    results_cache: dict[tuple[int, int], dict] = {}

    def api_results(request: Request):
        # A plain function: Starlette runs it in a worker thread, so the bootstrap never stalls other requests.
        from .ranking import summarize

        try:
            rounds = min(2000, max(0, int(request.query_params.get("rounds", "1000"))))
        except ValueError:
            return bad("rounds must be an integer")
        rows = store.rows()
        key = (len(rows), rounds)  # rows are append-only: the count identifies the set
        if key not in results_cache:
            results_cache.clear()
            results_cache[key] = summarize(rows, rounds=rounds)
        return JSONResponse(results_cache[key], headers={"Cache-Control": "no-store"})

    async def api_csv(request: Request):
        return Response(store.csv(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="studio-votes.csv"'})

    async def home(request: Request):
        return RedirectResponse("/runs")

    routes = [
        Route("/", home),
        Route("/runs", page("runs")),
        Route("/timeline", page("timeline")),
        Route("/ab", page("ab")),
        Route("/files/{root}/{path:path}", files),
        Route("/api/roots", api_roots),
        Route("/api/runs", api_runs),
        Route("/api/metrics", api_metrics),
        Route("/api/timeline", api_timeline),
        Route("/api/sources", api_sources),
        Route("/api/ab/next", api_next),
        Route("/api/ab/image", api_image),
        Route("/api/ab/vote", api_vote, methods=["POST"]),
        Route("/api/ab/results", api_results),
        Route("/api/ab/votes.csv", api_csv),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(trusted_hosts))]
    if token:
        middleware.insert(0, Middleware(TokenGate, token=token))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.store = store
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

"""The studio's pages and JSON API as one object: its folders, its vote store, its handlers.

Imported only when a server is built (it needs the `studio` extra's starlette). Left/right placement
of a pair is decided by the store's secret (`placement`), so a page cannot tell which source is which.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

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
SIDES = ("left", "right")
ANSWER_KEYS = ("left", "right", "tie", "both_bad")
NONCE_RE = re.compile(r"^[0-9a-f]{16}$")
PAGE_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"


def placement(secret: bytes, pair: str, nonce: str) -> str:
    """'AB' (source A on the left) or 'BA', decided by the server's secret: the page cannot tell which."""
    return "AB" if hmac.new(secret, f"{pair}|{nonce}".encode(), hashlib.sha256).digest()[0] & 1 == 0 else "BA"


class Studio:
    """The folders being shown, the vote store, and a handler per route (`routes()`)."""

    def __init__(self, folders: list[str | Path], db: str | Path):
        self.roots = open_roots(folders)
        self.catalog = Catalog(self.roots)
        self.store = VoteStore(db)
        self.secret = self.store.secret()
        self.tails: dict[str, MetricsTail] = {}
        self.results_cache: dict[tuple[int, int], dict] = {}

    def bad(self, msg: str, status: int = 400):
        return JSONResponse({"error": msg}, status_code=status)

    def root_of(self, root_id: str):
        root = self.catalog.roots.get(root_id)
        if root is None:
            raise HTTPException(404, f"no folder {root_id!r}")
        return root

    def serve(self, root, rel: str):
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

    def file_url(self, root_id: str, rel: str) -> str:
        return f"/files/{root_id}/{quote(rel)}"

    def page(self, name: str):
        async def handler(request: Request):
            return FileResponse(STATIC / f"{name}.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                                  "Cache-Control": "no-store"})
        return handler

    async def files(self, request: Request):
        return self.serve(self.root_of(request.path_params["root"]), request.path_params["path"])

    async def api_roots(self, request: Request):
        return JSONResponse([{"id": r.id, "name": r.name, "path": str(r.path), "is_run": r.is_run,
                              "has_captions": r.has_captions, "validation": bool(validation_images(r))}
                             for r in self.roots])

    async def api_runs(self, request: Request):
        out = []
        for r in self.roots:
            for label, path in metrics_files(r):
                run_id = f"{r.id}/{label}"
                self.tails.setdefault(run_id, MetricsTail(path))
                out.append({"id": run_id, "root": r.name, "label": label, "name": f"{r.name} {label}"})
        return JSONResponse(out)

    async def api_metrics(self, request: Request):
        run_id = request.query_params.get("run", "")
        if run_id not in self.tails:
            await self.api_runs(request)  # a resumed run may have started a new logs/<time>/ since
        tail = self.tails.get(run_id)
        if tail is None:
            return self.bad(f"unknown run {run_id!r}", 404)
        try:
            start = max(0, int(request.query_params.get("from", "0")))
        except ValueError:
            return self.bad("from must be an integer")
        recs = tail.refresh()
        return JSONResponse({"run": run_id, "from": start, "total": len(recs), "records": recs[start:],
                             "bad_lines": tail.bad_lines}, headers={"Cache-Control": "no-store"})

    async def api_timeline(self, request: Request):
        root = self.root_of(request.query_params.get("root", ""))
        images = validation_images(root)
        prompts = validation_prompts(run_config(root)) if images else []
        return JSONResponse({
            "root": root.id, "name": root.name, "prompts": prompts,
            "steps": sorted({v.step for v in images}),
            "images": [{"epoch": v.epoch, "step": v.step, "prompt": v.prompt, "image": v.image,
                        "url": self.file_url(root.id, v.rel)} for v in images]},
            headers={"Cache-Control": "no-store"})

    async def api_sources(self, request: Request):
        try:
            return JSONResponse([{"id": s.id, "name": s.name, "kind": s.kind, "count": len(s.items)}
                                 for s in self.catalog.sources()])
        except StudioError as e:
            return self.bad(str(e), 500)

    def pair_context(self, a_id: str, b_id: str):
        a, b = self.catalog.source(a_id), self.catalog.source(b_id)
        if a is None or b is None:
            raise HTTPException(400, f"unknown source {a_id if a is None else b_id!r}")
        if a.id == b.id:
            raise HTTPException(400, "choose two different sources")
        return a, b, {p.id: p for p in self.catalog.pairs(a, b)}

    async def api_next(self, request: Request):
        q = request.query_params
        a, b, pairs = self.pair_context(q.get("a", ""), q.get("b", ""))
        if not pairs:
            return JSONResponse({"pair": None, "total": 0,
                                 "reason": f"{a.name} and {b.name} share no image with the same prompt and seed"})
        counts = self.store.rater_counts(q.get("rater", "").strip(), list(pairs))
        least = min(counts.values())
        pid = secrets.choice(sorted(p for p, c in counts.items() if c == least))
        nonce = secrets.token_hex(8)
        pair = pairs[pid]
        base = f"/api/ab/image?a={quote(a.id)}&b={quote(b.id)}&pair={pid}&nonce={nonce}&side="
        return JSONResponse({"pair": pid, "nonce": nonce, "prompt": pair.a.prompt, "seed": pair.a.seed,
                             "left": base + "left", "right": base + "right", "total": len(pairs),
                             "rated": sum(1 for c in counts.values() if c > 0)},
                            headers={"Cache-Control": "no-store"})

    async def api_image(self, request: Request):
        q = request.query_params
        _, _, pairs = self.pair_context(q.get("a", ""), q.get("b", ""))
        pair, nonce, side = pairs.get(q.get("pair", "")), q.get("nonce", ""), q.get("side", "")
        if pair is None or not NONCE_RE.match(nonce) or side not in SIDES:
            raise HTTPException(400, "unknown pair, bad nonce or side")
        first = pair.a if placement(self.secret, pair.id, nonce) == "AB" else pair.b
        item = first if side == "left" else (pair.b if first is pair.a else pair.a)
        return self.serve(self.root_of(item.root), item.rel)

    async def api_vote(self, request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self.bad("send the vote as application/json", 415)
        try:
            body = await request.json()
        except ValueError:
            return self.bad("the body is not JSON")
        if not isinstance(body, dict):
            return self.bad("the body must be a JSON object")
        answer, rater, nonce = body.get("answer"), body.get("rater"), body.get("nonce")
        if answer not in ANSWER_KEYS:
            return self.bad(f"answer must be one of {', '.join(ANSWER_KEYS)}")
        if not isinstance(rater, str) or not rater.strip() or len(rater) > 64:
            return self.bad("give a rater name (1-64 characters)")
        if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
            return self.bad("bad nonce")
        try:
            a, b, pairs = self.pair_context(str(body.get("a", "")), str(body.get("b", "")))
        except HTTPException as e:
            return self.bad(e.detail)
        pair = pairs.get(body.get("pair"))
        if pair is None:
            return self.bad(f"unknown pair id {body.get('pair')!r} for {a.name} vs {b.name}")
        shown = placement(self.secret, pair.id, nonce)
        if answer in SIDES:
            answer = "A" if (answer == "left") == (shown == "AB") else "B"
        vote_id = self.store.add(rater=rater.strip(), source_a=a.name, source_b=b.name,
                            image_a=str(self.catalog.roots[pair.a.root].path / pair.a.rel),
                            image_b=str(self.catalog.roots[pair.b.root].path / pair.b.rel),
                            prompt=pair.a.prompt, seed=pair.a.seed, pair_id=pair.id, shown=shown, answer=answer)
        names = (a.name, b.name) if shown == "AB" else (b.name, a.name)
        return JSONResponse({"id": vote_id, "answer": answer, "left": names[0], "right": names[1],
                             "votes": self.store.count()})

    def api_results(self, request: Request):
        # Not async: Starlette runs it in a worker thread, so the bootstrap never stalls other requests.
        from .ranking import summarize

        try:
            rounds = min(2000, max(0, int(request.query_params.get("rounds", "1000"))))
        except ValueError:
            return self.bad("rounds must be an integer")
        rows = self.store.rows()
        key = (len(rows), rounds)  # rows are append-only: the count identifies the set
        if key not in self.results_cache:
            self.results_cache.clear()
            self.results_cache[key] = summarize(rows, rounds=rounds)
        return JSONResponse(self.results_cache[key], headers={"Cache-Control": "no-store"})

    async def api_csv(self, request: Request):
        return Response(self.store.csv(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="studio-votes.csv"'})

    async def home(self, request: Request):
        return RedirectResponse("/runs")

    def routes(self) -> list:
        return [
            Route("/", self.home),
            Route("/runs", self.page("runs")),
            Route("/timeline", self.page("timeline")),
            Route("/ab", self.page("ab")),
            Route("/files/{root}/{path:path}", self.files),
            Route("/api/roots", self.api_roots),
            Route("/api/runs", self.api_runs),
            Route("/api/metrics", self.api_metrics),
            Route("/api/timeline", self.api_timeline),
            Route("/api/sources", self.api_sources),
            Route("/api/ab/next", self.api_next),
            Route("/api/ab/image", self.api_image),
            Route("/api/ab/vote", self.api_vote, methods=["POST"]),
            Route("/api/ab/results", self.api_results),
            Route("/api/ab/votes.csv", self.api_csv),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]

"""The studio's pages and JSON API as one object: its folders, its vote store, its handlers.

Imported only when a server is built (it needs the `studio` extra's starlette). Left/right placement
of a pair is decided by the store's secret (`placement`), so a page cannot tell which source is which.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
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
    TRAIN_DEFAULT_SEED,
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
from .votes import NonceError, VoteStore

STATIC = Path(__file__).parent / "static"
SIDES = ("left", "right")
ANSWER_KEYS = ("left", "right", "tie", "both_bad")
NONCE_RE = re.compile(r"^[0-9a-f]{16}$")
MAX_BODY = 16 * 1024  # a vote is under 1 KB; anything larger is refused before it is read
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
            gen = int(request.query_params.get("gen", "-1"))
        except ValueError:
            return self.bad("from and gen must be integers")
        recs = tail.refresh()
        if gen != tail.gen:  # the page holds records of a file since replaced: send it all again
            start = 0
        return JSONResponse({"run": run_id, "gen": tail.gen, "from": start, "total": len(recs),
                             "records": recs[start:], "bad_lines": tail.bad_lines, "problems": tail.problems},
                            headers={"Cache-Control": "no-store"})

    async def api_metrics_csv(self, request: Request):
        tail = self.tails.get(request.query_params.get("run", ""))
        if tail is None:
            await self.api_runs(request)
            tail = self.tails.get(request.query_params.get("run", ""))
        if tail is None:
            return self.bad("unknown run", 404)
        recs = tail.refresh()
        keys = list(dict.fromkeys(k for r in recs for k in r))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(keys)
        for r in recs:
            w.writerow(["" if r.get(k) is None else r.get(k) for k in keys])
        name = re.sub(r"[^\w.-]+", "_", request.query_params["run"])
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="metrics-{name}.csv"'})

    async def api_config(self, request: Request):
        """Every run's train.py settings (its newest config.json), for the settings table and its diff."""
        return JSONResponse([{"id": r.id, "name": r.name, "config": run_config(r)} for r in self.roots if r.is_run],
                            headers={"Cache-Control": "no-store"})

    async def api_timeline(self, request: Request):
        root = self.root_of(request.query_params.get("root", ""))
        images = validation_images(root)
        cfg = run_config(root)
        prompts = validation_prompts(cfg) if images else []
        base = int(cfg.get("seed", TRAIN_DEFAULT_SEED)) if isinstance(cfg.get("seed"), int) else TRAIN_DEFAULT_SEED
        return JSONResponse({
            "root": root.id, "name": root.name, "prompts": prompts,
            "steps": sorted({v.step for v in images}),
            "images": [{"epoch": v.epoch, "step": v.step, "prompt": v.prompt, "image": v.image,
                        "seed": base + 1000 * v.prompt + v.image,
                        "text": prompts[v.prompt] if v.prompt < len(prompts) else f"prompt {v.prompt}",
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
        rater = q.get("rater", "").strip()
        counts = self.store.rater_counts(rater, list(pairs))
        unrated = sorted(p for p, c in counts.items() if c == 0)
        if not unrated:
            return JSONResponse({"pair": None, "done": True, "total": len(pairs), "rated": len(pairs),
                                 "reason": f"{rater or 'you'}: all {len(pairs)} pairs of {a.name} vs {b.name} rated; "
                                           "choose other sources or another rater name"},
                                headers={"Cache-Control": "no-store"})
        skipped = q.get("skip", "")
        pid = secrets.choice([p for p in unrated if p != skipped] or unrated)
        nonce = self.store.issue(pid, a.id, b.id)
        pair = pairs[pid]
        base = f"/api/ab/image?a={quote(a.id)}&b={quote(b.id)}&pair={pid}&nonce={nonce}&side="
        return JSONResponse({"pair": pid, "nonce": nonce, "prompt": pair.a.prompt, "seed": pair.a.seed,
                             "left": base + "left", "right": base + "right", "total": len(pairs),
                             "rated": len(pairs) - len(unrated)},
                            headers={"Cache-Control": "no-store"})

    async def api_image(self, request: Request):
        q = request.query_params
        a, b, pairs = self.pair_context(q.get("a", ""), q.get("b", ""))
        pair, nonce, side = pairs.get(q.get("pair", "")), q.get("nonce", ""), q.get("side", "")
        if pair is None or not NONCE_RE.match(nonce) or side not in SIDES:
            raise HTTPException(400, "unknown pair, bad nonce or side")
        if not self.store.issued(nonce, pair.id, a.id, b.id):
            raise HTTPException(400, "this nonce was not issued for this pair")
        first = pair.a if placement(self.secret, pair.id, nonce) == "AB" else pair.b
        item = first if side == "left" else (pair.b if first is pair.a else pair.a)
        return self.serve(self.root_of(item.root), item.rel)

    async def json_body(self, request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return None, self.bad("send the body as application/json", 415)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return None, self.bad("the body is not JSON")
        if not isinstance(body, dict):
            return None, self.bad("the body must be a JSON object")
        return body, None

    async def api_vote(self, request: Request):
        body, error = await self.json_body(request)
        if error:
            return error
        answer, rater, nonce = body.get("answer"), body.get("rater"), body.get("nonce")
        if answer not in ANSWER_KEYS:
            return self.bad(f"answer must be one of {', '.join(ANSWER_KEYS)}")
        if not isinstance(rater, str) or not rater.strip() or len(rater) > 64:
            return self.bad("give a rater name (1-64 characters)")
        if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
            return self.bad("bad nonce")
        wrong = [k for k in ("a", "b", "pair") if not isinstance(body.get(k), str)]
        if wrong:
            return self.bad(f"{', '.join(wrong)} must be strings (ids from /api/sources and /api/ab/next)")
        try:
            a, b, pairs = self.pair_context(body["a"], body["b"])
        except HTTPException as e:
            return self.bad(e.detail)
        pair = pairs.get(body["pair"])
        if pair is None:
            return self.bad(f"unknown pair id {body['pair'][:40]!r} for {a.name} vs {b.name}")
        shown = placement(self.secret, pair.id, nonce)
        if answer in SIDES:
            answer = "A" if (answer == "left") == (shown == "AB") else "B"
        try:
            vote_id = self.store.add(
                nonce=nonce, source_a_id=a.id, source_b_id=b.id, rater=rater.strip(), source_a=a.name,
                source_b=b.name, image_a=str(self.catalog.roots[pair.a.root].path / pair.a.rel),
                image_b=str(self.catalog.roots[pair.b.root].path / pair.b.rel), prompt=pair.a.prompt,
                seed=pair.a.seed, pair_id=pair.id, shown=shown, answer=answer)
        except NonceError as e:
            return self.bad(str(e), e.status)
        names = (a.name, b.name) if shown == "AB" else (b.name, a.name)
        return JSONResponse({"id": vote_id, "answer": answer, "left": names[0], "right": names[1],
                             "votes": self.store.count()})

    async def api_undo(self, request: Request):
        body, error = await self.json_body(request)
        if error:
            return error
        nonce = body.get("nonce")
        if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
            return self.bad("bad nonce")
        try:
            vote_id = self.store.undo(nonce)
        except NonceError as e:
            return self.bad(str(e), e.status)
        return JSONResponse({"undone": vote_id, "votes": self.store.count()})

    def api_results(self, request: Request):
        # Not async: Starlette runs it in a worker thread, so the bootstrap never stalls other requests.
        from .ranking import summarize

        try:
            rounds = min(2000, max(0, int(request.query_params.get("rounds", "1000"))))
        except ValueError:
            return self.bad("rounds must be an integer")
        rows = self.store.rows(undone=True)
        # Votes and undos are append-only: their counts identify the set that counts.
        key = (len(rows), sum(1 for r in rows if r["undone"]), rounds)
        rows = [r for r in rows if not r["undone"]]
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
            Route("/api/metrics.csv", self.api_metrics_csv),
            Route("/api/config", self.api_config),
            Route("/api/timeline", self.api_timeline),
            Route("/api/sources", self.api_sources),
            Route("/api/ab/next", self.api_next),
            Route("/api/ab/image", self.api_image),
            Route("/api/ab/vote", self.api_vote, methods=["POST"]),
            Route("/api/ab/undo", self.api_undo, methods=["POST"]),
            Route("/api/ab/results", self.api_results),
            Route("/api/ab/votes.csv", self.api_csv),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]

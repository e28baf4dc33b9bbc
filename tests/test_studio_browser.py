"""The studio's three pages in a real headless browser: Debian's chromium driven by Playwright.

Playwright is given the system browser's path (no browser download); CI installs both (`.ci/run`).
With STUDIO_SCREENSHOTS=/some/folder the tests save a PNG of each page there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

# CI sets STUDIO_REQUIRE_BROWSER=1: there a missing piece is a failure, not a skip.
REQUIRED = os.environ.get("STUDIO_REQUIRE_BROWSER") == "1"
CHROMIUM = os.environ.get("STUDIO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
try:
    import starlette  # noqa: F401
    from playwright import sync_api
except ImportError as e:
    if REQUIRED:
        raise
    pytest.skip(f"{e.name} is not installed: pip install -e '.[dev]'", allow_module_level=True)
if not CHROMIUM:
    if REQUIRED:
        raise RuntimeError("no chromium on PATH: apt-get install chromium (or set STUDIO_CHROMIUM)")
    pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run does)", allow_module_level=True)

from test_studio import PROMPTS, Studio, make_generated, make_run, metric_line  # noqa: E402

TIMEOUT_MS = 20_000
PIXEL_JS = """(id) => {
  const img = document.getElementById(id);
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return Array.from(ctx.getImageData(0, 0, 1, 1).data.slice(0, 3));
}"""
RED, BLUE = [255, 0, 0], [0, 0, 255]


def screenshot(page, name: str) -> None:
    folder = os.environ.get("STUDIO_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def setup(tmp_path):
    run = make_run(tmp_path / "shoes-r8")
    run2 = make_run(tmp_path / "shoes-r16", lines=5, steps=(100, 200), scale=0.07)
    base = make_generated(tmp_path / "base", BLUE, n=11)  # 22 pairs: more than any test votes on
    lora = make_generated(tmp_path / "lora", RED, n=11)
    db = tmp_path / "votes.sqlite"
    studio = Studio([run, run2, base, lora], db)
    yield studio, run, db
    studio.kill()


def new_page(browser, studio):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return page


def n_points(page, run_id: str, key: str = "loss") -> tuple[int, int]:
    """(data-n, number of x,y pairs actually drawn) of one run's line (an SVG path: M/L per point)."""
    line = page.locator(f'#chart-{key} path.series[data-run="{run_id}"][data-key="{key}"]')
    return int(line.get_attribute("data-n")), len(re.findall(r"[ML]", line.get_attribute("d")))


def test_runs_page_draws_every_line_and_follows_the_growing_file(browser, setup):
    studio, run, _ = setup
    page = new_page(browser, studio)
    page.goto(studio.base + "/runs")
    run_id = "0/20260101-120000"
    page.wait_for_selector(f'path.series[data-run="{run_id}"]')
    assert n_points(page, run_id) == (7, 7)  # metrics.jsonl has 7 lines
    assert n_points(page, "1/20260101-120000") == (5, 5)  # the second run on the same chart
    for key in ("lr", "grad_norm", "peak_memory_gb"):
        assert n_points(page, run_id, key) == (7, 7)
    # Seconds per step: the first step (compile included) is written beside the chart, not on its axis.
    assert n_points(page, run_id, "s_per_step") == (6, 6)
    assert "shoes-r8 20260101-120000 step 1: 2.5 s" in page.locator("#chart-s_per_step .note").inner_text()
    page.evaluate("window.__notReloaded = true")
    metrics = run / "logs" / "20260101-120000" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write(metric_line(8))
        f.write(json.dumps({"step": 8, "epoch": 0, "val_loss": 0.02}) + "\n")
    page.wait_for_function(
        f"""() => document.querySelector('#chart-loss path.series[data-run="{run_id}"][data-key="loss"]')
                 .getAttribute('data-n') === '8'""", timeout=TIMEOUT_MS)
    assert n_points(page, run_id) == (8, 8)
    assert page.evaluate("window.__notReloaded") is True
    page.wait_for_selector(f'path.series[data-run="{run_id}"][data-key="val_loss"][data-n="1"]', state="attached")
    assert page.locator(f'#chart-loss circle.marker[data-run="{run_id}"][data-key="val_loss"]').count() == 1
    screenshot(page, "studio-runs.png")
    page.context.close()


def test_timeline_shows_each_prompts_images_in_step_order(browser, setup):
    studio, run, _ = setup
    page = new_page(browser, studio)
    page.goto(studio.base + "/timeline")
    page.wait_for_selector(".strip img")
    imgs = page.locator(".strip img")
    assert imgs.count() == 3 * 2 * 2  # steps x prompts x images; the grid PNGs are not in the rows
    page.wait_for_function(
        "() => [...document.querySelectorAll('.strip img')].every(i => i.complete && i.naturalWidth)")
    rows = page.evaluate("""() => [...document.querySelectorAll('.strip')].map(r =>
        [...r.querySelectorAll('img')].map(i => decodeURIComponent(i.getAttribute('src')).split('/').pop()))""")
    assert rows == [[f"epoch{s // 100:03d}_step{s:04d}_prompt{p}_img{i}.png" for s in (100, 200, 300)]
                    for p in range(2) for i in range(2)]
    headings = page.locator(".prompt-block h3").all_inner_texts()
    assert headings == [f"prompt {p}: {text}" for p, text in enumerate(PROMPTS)]
    screenshot(page, "studio-timeline.png")

    def shown():
        src = unquote(page.locator("#lightbox img").get_attribute("src"))
        return src.split("/")[-1], page.evaluate(PIXEL_JS.replace('getElementById(id)',
                                                                  'querySelector("#lightbox img")'),
                                                  None)

    page.locator('.strip img[data-row="2"][data-col="0"]').click()  # prompt 1, image 0, first step
    page.wait_for_selector("#lightbox.open")
    page.wait_for_function("() => document.querySelector('#lightbox img').naturalWidth > 0")
    assert shown() == ("epoch001_step0100_prompt1_img0.png", [100, 40, 0])
    for key, step in (("ArrowRight", 200), ("ArrowRight", 300), ("ArrowRight", 300), ("ArrowLeft", 200)):
        page.keyboard.press(key)
        page.wait_for_function(f"() => document.querySelector('#lightbox').dataset.step === '{step}'")
        page.wait_for_function("() => document.querySelector('#lightbox img').complete")
        name, pixel = shown()
        assert name == f"epoch{step // 100:03d}_step{step:04d}_prompt1_img0.png" and pixel == [step % 256, 40, 0]
    page.keyboard.press("ArrowDown")  # the next row: prompt 1, image 1, same step
    page.wait_for_function("() => document.querySelector('#lightbox img').complete")
    assert shown()[0] == "epoch002_step0200_prompt1_img1.png"
    screenshot(page, "studio-timeline-enlarged.png")
    page.keyboard.press("Escape")
    page.wait_for_selector("#lightbox:not(.open)", state="attached")
    # A validation written while the page is open (training goes on) appears without a reload.
    for p in range(2):
        for i in range(2):
            Image.new("RGB", (32, 32), (144, 40 * p,
                                        60 * i)).save(run / "validation" / f"epoch004_step0400_prompt{p}_img{i}.png")
    page.wait_for_function("() => document.querySelectorAll('.strip img').length === 16")
    assert page.locator('.strip img[data-row="0"]').last.get_attribute("data-step") == "400"
    page.context.close()


def start_voting(page, studio, rater: str, a: str = "base", b: str = "lora") -> None:
    page.goto(studio.base + "/ab")
    page.wait_for_selector("#srcA option", state="attached")
    ids = {s["name"]: s["id"] for s in studio.json("/api/sources")}
    page.select_option("#srcA", ids[a])
    page.select_option("#srcB", ids[b])
    page.fill("#rater", rater)
    page.click("#start")
    page.wait_for_selector('body[data-ready="1"]')


def lora_side(page) -> str:
    left, right = page.evaluate(PIXEL_JS, "left"), page.evaluate(PIXEL_JS, "right")
    assert sorted([left, right]) == sorted([RED, BLUE]), (left, right)
    return "left" if left == RED else "right"


def wait_votes(page, n: int) -> None:
    page.wait_for_function(f"() => document.body.dataset.votes === '{n}' && document.body.dataset.ready === '1'")


def test_twenty_keyboard_votes_are_stored_ranked_and_survive_a_restart(browser, setup, tmp_path):
    studio, _, db = setup
    page = new_page(browser, studio)
    start_voting(page, studio, "ana")
    expected = []
    for k in range(20):
        side = lora_side(page)  # the test looks at the pixels, as a rater looks at the images
        if k % 5 == 3:
            key, answer = ("t" if k % 2 else "ArrowDown"), "tie"
        elif k % 7 == 6:
            key, answer = "x", "both_bad"
        else:
            key = {"left": "a" if k % 2 else "ArrowLeft", "right": "b" if k % 2 else "ArrowRight"}[side]
            answer = "B"  # lora is source B
        expected.append((side, answer))
        page.keyboard.press(key)
        wait_votes(page, k + 1)
    rows = sqlite3.connect(db).execute("SELECT rater, source_a, source_b, shown, answer FROM votes ORDER BY id")
    rows = rows.fetchall()
    assert len(rows) == 20
    assert all(r[:3] == ("ana", "base", "lora") for r in rows)
    assert [r[4] for r in rows] == [a for _, a in expected]
    assert [r[3] for r in rows] == ["BA" if side == "left" else "AB" for side, _ in expected]  # lora left = BA
    page.wait_for_selector('#results[data-votes="20"]', state="attached")
    cells = page.evaluate(
        "() => [...document.querySelectorAll('#pairs tr')].map(r => [...r.cells].map(c => c.innerText))")
    answers = [a for _, a in expected]
    assert cells[1:] == [["base vs lora", "0", str(answers.count("B")), str(answers.count("tie")),
                          str(answers.count("both_bad"))]]
    ranking = page.locator("#ranking tr").all_inner_texts()
    assert "lora" in ranking[1] and "base" in ranking[2]
    screenshot(page, "studio-ab.png")
    page.context.close()

    studio.kill()  # SIGKILL: no shutdown handler runs
    again = Studio(studio_folders(studio), db)
    try:
        res = again.json("/api/ab/results?rounds=100")
        assert res["votes"] == 20 and res["ratings"][0]["name"] == "lora"
        page = new_page(browser, again)
        start_voting(page, again, "ana")
        page.keyboard.press("t")
        wait_votes(page, 1)
        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 21
        page.context.close()
    finally:
        again.kill()


def studio_folders(studio) -> list[str]:
    args = studio.proc.args
    return args[args.index("mlx_sd.studio") + 1: args.index("--port")]


def test_two_browsers_voting_at_once_lose_nothing(browser, setup):
    studio, _, db = setup
    p1, p2 = new_page(browser, studio), new_page(browser, studio)
    start_voting(p1, studio, "ana")
    start_voting(p2, studio, "ben")
    sides = []
    for k in range(10):
        sides.append(lora_side(p1))
        p1.keyboard.press("a")  # both presses go out before either vote is answered
        p2.keyboard.press("t")
        wait_votes(p1, k + 1)
        wait_votes(p2, k + 1)
    rows = sqlite3.connect(db).execute("SELECT rater, shown, answer FROM votes ORDER BY id").fetchall()
    assert len(rows) == 20
    ana = [r for r in rows if r[0] == "ana"]
    ben = [r for r in rows if r[0] == "ben"]
    assert len(ana) == 10 and len(ben) == 10
    assert all(r[2] == "tie" for r in ben)
    # "a" picks the left image: source A (base) when shown AB, source B (lora) when shown BA.
    assert [r[2] for r in ana] == ["B" if s == "left" else "A" for s in sides]
    assert [r[1] for r in ana] == ["BA" if s == "left" else "AB" for s in sides]
    for p in (p1, p2):
        p.context.close()


def test_pages_work_without_network_access(browser, setup):
    """Every request the pages make goes to the studio itself (no CDN): block everything else and look."""
    studio, _, _ = setup
    page = new_page(browser, studio)
    outside = []
    page.context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(studio.base)
                       else (outside.append(route.request.url), route.abort()))
    for path, ready in (("/runs", "path.series"), ("/timeline", ".strip img"), ("/ab", "#srcA option")):
        page.goto(studio.base + path)
        page.wait_for_selector(ready, state="attached")
        time.sleep(0.3)
    assert outside == []
    page.context.close()


def svg_texts(page, selector: str) -> list[str]:
    return page.locator(selector).evaluate_all("els => els.map(e => e.textContent)")


def grow(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_runs_page_survives_nan_bad_lines_a_failing_run_and_a_replaced_file(browser, setup):
    studio, run, _ = setup
    metrics = run / "logs" / "20260101-120000" / "metrics.jsonl"
    other = run.parent / "shoes-r16" / "logs" / "20260101-120000" / "metrics.jsonl"
    grow(metrics, json.dumps({"step": 8, "epoch": 0, "loss": 0.01, "grad_norm": float("nan")}) + "\n{broken\n"
         + metric_line(9))
    page = new_page(browser, studio)
    run_id, other_id = "0/20260101-120000", "1/20260101-120000"
    for attempt in ("first load", "reload"):  # a NaN once froze every run, even after a reload
        page.goto(studio.base + "/runs") if attempt == "first load" else page.reload()
        page.wait_for_selector(f'#chart-grad_norm path.series[data-run="{run_id}"][data-gaps="1"]', state="attached")
        assert n_points(page, run_id, "grad_norm") == (8, 8)  # 9 lines with a grad_norm, one of them NaN
        assert n_points(page, run_id, "loss") == (9, 9)
        d = page.locator(f'#chart-grad_norm path.series[data-run="{run_id}"]').get_attribute("d")
        assert d.count("M") == 2  # the line stops at the NaN and starts again after it
        problems = page.locator("#problems").inner_text()
        assert "line 8: step 8: grad_norm not finite" in problems and "line 9: skipped" in problems, problems
    # One run's failing answers (here: forced to 500) never stop the other run from following its file.
    page.route(re.compile(r"/api/metrics\?run=0%2F"), lambda route: route.fulfill(
        status=500, content_type="application/json", body='{"error": "disk on fire"}'))
    grow(other, metric_line(6) + metric_line(7))
    page.wait_for_selector(f'#chart-loss path.series[data-run="{other_id}"][data-n="7"]', state="attached")
    page.wait_for_function("() => document.querySelector('#problems').innerText.includes('disk on fire')")
    page.unroute(re.compile(r"/api/metrics\?run=0%2F"))
    # A file replaced by a longer one is read from its start: no step of the old file stays.
    metrics.write_text("".join(metric_line(s) for s in range(101, 131)))
    page.wait_for_selector(f'#chart-loss path.series[data-run="{run_id}"][data-n="30"]', state="attached")
    assert "disk on fire" not in page.locator("#problems").inner_text()
    screenshot(page, "studio-runs-problems.png")
    page.context.close()


def test_runs_zoom_hover_log_ticks_smoothing_settings_and_png(browser, tmp_path):
    short = make_run(tmp_path / "short", lines=100, steps=(50,))
    long = make_run(tmp_path / "long", lines=10_000, steps=(5000,), scale=0.3)
    for path, cfg in ((short, {"seed": 42, "rank": 8, "learning_rate": 1e-4}),
                      (long, {"seed": 7, "rank": 16, "learning_rate": 1e-4})):
        config = path / "logs" / "20260101-120000" / "config.json"
        config.write_text(json.dumps({**cfg, "validation_prompts": PROMPTS}))
    studio = Studio([short, long], tmp_path / "v.sqlite")
    page = new_page(browser, studio)
    try:
        page.goto(studio.base + "/runs")
        long_loss = '#chart-loss path.series[data-run="1/20260101-120000"][data-n="10000"]'
        page.wait_for_selector(long_loss, state="attached")
        assert page.evaluate("document.body.dataset.view") == "all"
        box = page.locator("#chart-loss svg").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -300)  # zoom in around the cursor
        page.wait_for_function("() => document.body.dataset.view !== 'all'")
        page.fill("#x0", "1")
        page.fill("#x1", "100")
        page.locator("#x1").dispatch_event("change")
        page.wait_for_function("() => document.body.dataset.view === '1-100'")
        for key in ("loss", "lr", "grad_norm"):  # every chart shares the zoomed step axis
            xt = [float(t) for t in svg_texts(page, f"#chart-{key} text.xtick")]
            assert xt and min(xt) >= 1 and max(xt) <= 100, (key, xt)
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] / 2)
        page.wait_for_selector("#tip:not([hidden])")
        tip = page.locator("#tip").inner_text()
        assert "short 20260101-120000 loss" in tip and "long 20260101-120000 loss" in tip, tip
        assert page.locator("#chart-loss text.ylabel").text_content() == "loss (MSE)"
        assert page.locator("#chart-peak_memory_gb text.ylabel").text_content() == "GB"
        page.check("#logy")
        page.wait_for_function("() => document.querySelector('#chart-loss text.ylabel').textContent.includes('log')")
        ticks = [float(t) for t in svg_texts(page, "#chart-loss text.ytick")]
        assert len(ticks) >= 2 and all(f"{t:.0e}"[0] in "125" and float(f"{t:.0e}") == t for t in ticks), ticks
        page.check("#smooth")
        page.wait_for_selector("#chart-loss path.smooth", state="attached")
        assert page.locator("#chart-lr path.smooth").count() == 0  # the schedule is drawn as it is
        screenshot(page, "studio-runs-zoomed.png")
        diff = page.locator("#settings-table tr.diff").evaluate_all("rows => rows.map(r => r.dataset.key)")
        assert diff == ["rank", "seed"], diff
        with page.expect_download() as dl:
            page.locator("#chart-loss button.png").click()
        png = Image.open(dl.value.path())
        assert png.format == "PNG" and png.size == (1120, 500)
        assert len(png.convert("RGB").getcolors(1 << 20)) > 3  # lines, not a blank image
    finally:
        page.context.close()
        studio.kill()


def test_timeline_puts_two_runs_side_by_side(browser, setup):
    studio, _, _ = setup
    page = new_page(browser, studio)
    page.goto(studio.base + "/timeline?root=0&with=1")
    page.wait_for_selector(".pairstrip img")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.pairstrip img')].every(i => i.complete && i.naturalWidth)")
    assert page.locator(".pairstrip").count() == 4  # 2 prompts x 2 images, matched on prompt text and seed
    cells = page.evaluate("""() => [...document.querySelectorAll('.pairstrip')].map(r =>
        [...r.querySelectorAll('.cell')].map(c => [c.dataset.step,
          [...c.querySelectorAll('img')].map(i => i.dataset.run), c.querySelectorAll('.missing').length]))""")
    for row in cells:  # shoes-r16 stopped at step 200: its place at 300 is marked empty
        assert row == [["100", ["shoes-r8", "shoes-r16"], 0], ["200", ["shoes-r8", "shoes-r16"], 0],
                       ["300", ["shoes-r8"], 1]]
    screenshot(page, "studio-timeline-compare.png")
    page.locator('.pairstrip img[data-run="shoes-r16"]').first.click()
    page.wait_for_selector("#lightbox.open")
    assert "shoes-r16 - step 100" in page.locator("#lightbox .cap").inner_text()
    page.context.close()


def test_phone_width_pages_fit_and_ab_keys_skip_undo_and_all_rated(browser, setup):
    studio, _, db = setup
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    for path, ready in (("/runs", "path.series"), ("/timeline", ".strip img")):
        page.goto(studio.base + path)
        page.wait_for_selector(ready, state="attached")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)
        screenshot(page, f"studio{path.replace('/', '-')}-390.png")
    page.goto(studio.base + "/ab")
    page.wait_for_selector("#srcA option", state="attached")
    ids = {s["name"]: s["id"] for s in studio.json("/api/sources")}
    page.select_option("#srcA", ids["shoes-r8 step 100"])  # 4 pairs with shoes-r16 step 100
    page.select_option("#srcB", ids["shoes-r16 step 100"])
    page.fill("#rater", "ana")
    page.press("#rater", "Enter")  # Enter in the rater box starts
    page.wait_for_selector('body[data-ready="1"]')
    first = page.locator("#arena").get_attribute("data-pair")
    page.wait_for_function("() => document.querySelector('#right').complete")
    screenshot(page, "studio-ab-390-voting.png")
    page.keyboard.press("s")  # skip: another pair, no vote
    page.wait_for_function(f"() => document.body.dataset.ready === '1' && "
                           f"document.querySelector('#arena').dataset.pair !== '{first}'")
    page.keyboard.press("Shift+A")  # upper case, as with Shift or Caps Lock
    wait_votes(page, 1)
    page.keyboard.press("B")
    wait_votes(page, 2)
    page.keyboard.press("u")  # undo the last vote
    wait_votes(page, 1)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM undone").fetchone()[0] == 1
    for k in range(3):
        page.keyboard.press("t")
        wait_votes(page, 2 + k)
    page.wait_for_selector("#done:not([hidden])")
    assert "all 4 pairs" in page.locator("#done").inner_text()
    assert not page.locator("#left").is_visible() and page.locator("#undo").is_visible()
    page.keyboard.press("t")  # nothing left to vote on: nothing stored
    time.sleep(0.3)
    assert conn.execute("SELECT COUNT(*) FROM votes WHERE id NOT IN (SELECT vote_id FROM undone)").fetchone()[0] == 4
    page.wait_for_selector('#results[data-votes="4"]', state="attached")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    screenshot(page, "studio-ab-390.png")
    ctx.close()

"""The web dashboard at /ui, driven in headless Chromium against a real gateway.

Needs the ``playwright`` Python package and a Chromium binary (Debian's
``/usr/bin/chromium``; ``playwright install`` is never needed). Screenshots of each
test land in its pytest tmp dir; ``DCF_UPDATE_SCREENSHOT=1`` also rewrites the
README's ``docs/dashboard.png`` from the SSD try-it test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, GatewayProcess, deploy

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the dashboard tests need playwright: pip install playwright"
)
sync_playwright, expect = playwright_api.sync_playwright, playwright_api.expect
expect.set_options(timeout=15_000)

CHROMIUM = next(
    (
        path
        for path in (
            os.environ.get("DCF_CHROMIUM"),
            "/usr/bin/chromium",
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
        )
        if path and Path(path).exists()
    ),
    None,
)
if CHROMIUM is None:
    pytest.skip(
        "the dashboard tests need Chromium (apt-get install chromium, or set DCF_CHROMIUM)",
        allow_module_level=True,
    )

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SSD_EXAMPLE = REPO / "examples" / "ssd-detector"
DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"
MARKER = f"dashboard-marker-{uuid.uuid4().hex[:12]}"

SHOUT = f"""
import dcf

print("{MARKER} loaded")


def Handler(req):
    text = req.input.decode()
    if text == "bad":
        raise dcf.HTTPError(400, "bad is not a word we shout")
    if text == "boom":
        raise RuntimeError("boom")
    print("shouting", text)
    return text.upper()
"""

ECHO = """
def Handler(req):
    return req.input
"""


# fixtures ------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def functions(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shout`` (a text function that logs) and ``scaler`` (left to the scale test)."""
    root = tmp_path_factory.mktemp("functions")
    deploy(gw, root, "shout", SHOUT)
    deploy(gw, root, "scaler", ECHO)
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path: Path) -> Iterator[object]:  # noqa: ANN001
    """A fresh tab (own sessionStorage); fails the test on uncaught script errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    tab.on(
        "console",
        lambda msg: (
            problems.append(f"console.error: {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text
            else None
        ),
    )
    yield tab
    try:
        tab.screenshot(path=str(tmp_path / "final.png"), full_page=True)
    finally:
        context.close()
    assert not problems, problems


def open_dashboard(page, gateway: GatewayProcess, hash_: str = "") -> None:  # noqa: ANN001
    page.goto(f"{gateway.url}/{hash_ and 'ui/' + hash_}")


def function_row(page, name: str):  # noqa: ANN001, ANN201
    return page.locator(f'#functions-table tr[data-function="{name}"]')


# tests ---------------------------------------------------------------------------------------


def test_table_lists_ready_function_and_updates_live(page, gw, functions) -> None:  # noqa: ANN001
    open_dashboard(page, gw)  # "/" redirects to /ui/
    row = function_row(page, "shout")
    expect(row).to_have_attribute("data-status", "Ready")
    expect(row.locator(".badge")).to_have_text("Ready")
    expect(row.locator(".badge")).to_have_class("badge status-ready")
    expect(row.locator("td.replicas")).to_have_text("1/1")
    expect(page.locator("#banner-unreachable")).to_be_hidden()
    expect(page.locator("#token-modal")).to_be_hidden()

    with gw.http() as http:
        before = http.get("/system/function/shout").json()["invocations"]
        for _ in range(3):
            assert http.post("/function/shout", content=b"hi").status_code == 200
        assert http.post("/function/shout", content=b"boom").status_code == 500
        info = http.get("/system/function/shout").json()
    assert info["invocations"] == before + 4
    # The table polls: the new counts show up without a reload.
    expect(row.locator("td.invocations")).to_have_text(str(info["invocations"]))
    expect(row.locator("td.error-rate")).to_have_text(_rate(info["errors"], info["invocations"]))
    expect(row.locator("td.p50")).to_contain_text("ms")
    expect(row.locator("td.p99")).to_contain_text("ms")

    row.locator("td.invocations").click()
    expect(page).to_have_url(f"{gw.url}/ui/#/function/shout")
    expect(page.locator("#function-name")).to_have_text("shout")
    expect(page.locator("#status-badge")).to_have_text("Ready")


def _rate(errors: int, invocations: int) -> str:
    """The dashboard's error-rate format."""
    pct = 100 * errors / invocations
    if errors == 0:
        return "0%"
    return f"{pct:.1f}%" if pct < 10 else f"{pct:.0f}%"


def test_function_page_shows_config_replicas_and_latency_chart(page, gw, functions) -> None:  # noqa: ANN001
    with gw.http() as http:
        for _ in range(5):
            http.post("/function/shout", content=b"warm")
        info = http.get("/system/function/shout").json()
    open_dashboard(page, gw, "#/function/shout")
    config = page.locator("#config-table")
    expect(config.locator('[data-key="handler.name"] dd')).to_have_text("Handler")
    expect(config.locator('[data-key="concurrency"] dd')).to_have_text(
        str(info["spec"]["concurrency"])
    )
    page.locator("#config-raw").check()
    expect(page.locator("#config-json")).to_contain_text('"runtime": "python3"')

    replica = info["replicas"]["list"][0]
    row = page.locator(f'#replicas-table tr[data-replica="{replica["id"]}"]')
    expect(row).to_have_attribute("data-state", "ready")
    expect(row).to_contain_text(str(replica["pid"]))
    expect(row).to_contain_text("local")  # the node it runs on
    expect(row.locator("td.isolation")).to_have_text(replica["isolation"])
    for key, value in (replica.get("limits") or {}).items():  # a sandbox's limits
        expect(page.locator("#replica-limits")).to_contain_text(f"{key} {value}")
    with gw.http() as http:
        mode = http.get("/system/info").json()["isolation"]
    expect(page.locator("#gateway-label")).to_contain_text(mode)

    # The chart is built from polling: a point per refresh, both lines drawn.
    page.wait_for_function(
        "Number(document.querySelector('#latency-chart')?.dataset.points) >= 2", timeout=15_000
    )
    expect(page.locator("#latency-chart path.p50")).to_have_count(1)
    expect(page.locator("#latency-chart path.p99")).to_have_count(1)
    expect(page.locator("#card-p50 .card-value")).to_contain_text("ms")


def test_try_it_with_text(page, gw, functions) -> None:  # noqa: ANN001
    open_dashboard(page, gw, "#/function/shout")
    expect(page.locator("#status-badge")).to_have_text("Ready")
    page.locator("#try-tab-text").click()
    for text, status, body in [
        ("hello dashboard", "200", "HELLO DASHBOARD"),
        ("bad", "400", "bad is not a word we shout"),
        ("boom", "500", "boom"),
    ]:
        page.locator("#try-input").fill(text)
        page.locator("#try-send").click()
        result = page.locator("#try-result")
        expect(result).to_have_attribute("data-state", "done")
        expect(page.locator("#try-status")).to_have_attribute("data-status", status)
        expect(page.locator("#try-body")).to_contain_text(body)
    # A function's error is its JSON {error, function}, shown pretty-printed.
    expect(page.locator("#try-body")).to_contain_text('"function": "shout"')


def test_logs_show_import_marker_and_refresh(page, gw, functions) -> None:  # noqa: ANN001
    open_dashboard(page, gw, "#/function/shout")
    logs = page.locator("#logs")
    expect(logs).to_contain_text(f"{MARKER} loaded")
    expect(logs).to_contain_text("[gateway]")
    call_marker = f"live-{uuid.uuid4().hex[:8]}"
    with gw.http() as http:
        assert http.post("/function/shout", content=call_marker.encode()).status_code == 200
    # Auto-refresh brings the handler's new output without a reload.
    expect(logs).to_contain_text(f"shouting {call_marker}")


def test_scale_from_ui(page, gw, functions) -> None:  # noqa: ANN001
    open_dashboard(page, gw, "#/function/scaler")
    expect(page.locator("#scale-min")).to_have_value("1")
    page.locator("#scale-min").fill("2")
    page.locator("#scale-max").fill("3")
    page.locator("#scale-apply").click()
    expect(page.locator("#scale-message")).to_have_text("Scaled: min 2, max 3.")
    with gw.http() as http:
        replicas = http.get("/system/function/scaler").json()["replicas"]
    assert (replicas["min"], replicas["max"]) == (2, 3)
    # The second replica starts and the page shows it.
    expect(page.locator("#card-replicas .card-value")).to_have_text("2/2")
    expect(page.locator("#replicas-table tr[data-state=ready]")).to_have_count(2)

    # The gateway's refusal is shown, and nothing changes.
    page.locator("#scale-min").fill("5")
    page.locator("#scale-max").fill("4")
    page.locator("#scale-apply").click()
    expect(page.locator("#scale-message")).to_contain_text("min (5) is more than max (4)")
    with gw.http() as http:
        replicas = http.get("/system/function/scaler").json()["replicas"]
    assert (replicas["min"], replicas["max"]) == (2, 3)


def test_delete_asks_first(page, gw, functions) -> None:  # noqa: ANN001
    deploy(gw, functions, "doomed", ECHO)
    open_dashboard(page, gw, "#/function/doomed")
    expect(page.locator("#status-badge")).to_have_text("Ready")

    page.locator("#delete-button").click()
    expect(page.locator("#confirm-modal")).to_be_visible()
    expect(page.locator("#confirm-title")).to_have_text("Delete doomed?")
    page.locator("#confirm-cancel").click()
    expect(page.locator("#confirm-modal")).to_be_hidden()
    with gw.http() as http:
        assert http.get("/system/function/doomed").status_code == 200

    page.locator("#delete-button").click()
    page.locator("#confirm-ok").click()
    expect(page).to_have_url(f"{gw.url}/ui/#/")
    expect(function_row(page, "shout")).to_be_visible()
    expect(function_row(page, "doomed")).to_have_count(0)
    with gw.http() as http:
        assert http.get("/system/function/doomed").status_code == 404


@pytest.mark.skipif(
    not (SSD_EXAMPLE / "config.yaml").exists(), reason="examples/ssd-detector is not there yet"
)
@pytest.mark.timeout(900)
def test_ssd_try_it_draws_the_boxes_the_api_returns(page, gw, functions, tmp_path) -> None:  # noqa: ANN001
    result = gw.dcf(
        "function",
        "create",
        "-f",
        str(SSD_EXAMPLE / "config.yaml"),
        "-g",
        gw.address,
        cwd=REPO,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr.decode()
    gw.wait_status("ssd-test", "Ready", timeout=300)
    samples = sorted((SSD_EXAMPLE / "samples").glob("*.jpg"))
    assert samples, "no sample pictures in examples/ssd-detector/samples"

    open_dashboard(page, gw, "#/function/ssd-test")
    expect(page.locator("#status-badge")).to_have_text("Ready")
    seen_boxes = 0
    # The picture with the most boxes last, so the page ends on it for the screenshot.
    expected_by_sample = {}
    with gw.http() as http:
        for sample in samples:
            answer = http.post("/function/ssd-test", content=base64.b64encode(sample.read_bytes()))
            assert answer.status_code == 200, answer.text
            expected_by_sample[sample] = answer.json()
    for n, sample in enumerate(sorted(samples, key=lambda s: len(expected_by_sample[s]))):
        expected = expected_by_sample[sample]
        if n % 2:
            page.locator("#try-file").set_input_files(str(sample))
        else:
            _drop_file(page, "#try-dropzone", sample)
        expect(page.locator("#try-dropzone")).to_contain_text(sample.name)
        expect(page.locator("#try-image-pane")).to_be_visible()
        page.locator("#try-send").click()
        expect(page.locator("#try-result")).to_have_attribute("data-state", "done")
        expect(page.locator("#try-status")).to_have_attribute("data-status", "200")
        canvas = page.locator("#detection-canvas")
        expect(canvas).to_have_attribute("data-box-count", str(len(expected)))
        items = page.locator("#detections li[data-class]")
        expect(items).to_have_count(len(expected))
        drawn = items.evaluate_all(
            "els => els.map(e => ({...e.dataset, color: getComputedStyle(e).backgroundColor}))"
        )
        for box, want in zip(drawn, expected, strict=True):
            assert box["class"] == str(want["class"])
            assert float(box["confidence"]) == pytest.approx(want["confidence"])
            assert box["label"] == f"{want['class']} {want['confidence']:.2f}"
            assert box["box"] == ",".join(str(want[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            # The box really is on the canvas: its left edge has the label's colour.
            pixel = canvas.evaluate(
                "(c, [x, y]) => Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data)",
                [want["xmin"], (want["ymin"] + want["ymax"]) // 2],
            )
            rgb = [int(v) for v in box["color"][box["color"].index("(") + 1 : -1].split(",")]
            assert pixel[:3] == pytest.approx(rgb, abs=8)
        raw = page.locator("#try-body").inner_text()
        assert json.loads(raw) == expected
        seen_boxes += len(expected)
    assert seen_boxes > 0, "the samples gave no detection at all: nothing was drawn"

    # The canvas shows the picture at its own size (pixel coordinates of the original).
    size = page.locator("#detection-canvas").evaluate("c => [c.width, c.height]")
    assert size[0] > 0 and size[1] > 0
    page.locator("#try-it").scroll_into_view_if_needed()
    page.screenshot(path=str(tmp_path / "ssd-try-it.png"), full_page=True)
    if os.environ.get("DCF_UPDATE_SCREENSHOT"):
        _readme_screenshot(page)


def _drop_file(page, selector: str, path: Path) -> None:  # noqa: ANN001
    """Drag and drop a file onto an element, as a user dragging it from their desktop."""
    page.locator(selector).evaluate(
        """(el, [name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, { type: "image/jpeg" }));
            for (const type of ["dragenter", "dragover", "drop"]) {
                el.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true,
                                                       cancelable: true }));
            }
        }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def _readme_screenshot(page) -> None:  # noqa: ANN001
    """Header, cards, chart and the try-it panel with boxes: the README's picture."""
    # Wait for polls to show the calls just made and for a few chart points.
    page.wait_for_function(
        "Number(document.querySelector('#latency-chart')?.dataset.points) >= 3", timeout=20_000
    )
    # Photos weigh a lot in a PNG: show the result a little smaller to stay under 300 KB.
    page.add_style_tag(content="#detection-canvas { max-height: 300px; }")
    page.evaluate("window.scrollTo(0, 0)")
    time.sleep(0.3)
    bottom = page.locator("#try-it").evaluate("e => e.getBoundingClientRect().bottom + scrollY")
    DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(
        path=str(DOCS_SCREENSHOT),
        full_page=True,
        clip={"x": 0, "y": 0, "width": 1280, "height": bottom + 16},
    )
    with contextlib.suppress(ImportError):  # recompress harder when OpenCV is at hand
        import cv2

        image = cv2.imread(str(DOCS_SCREENSHOT))
        cv2.imwrite(str(DOCS_SCREENSHOT), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert DOCS_SCREENSHOT.stat().st_size < 300_000, DOCS_SCREENSHOT.stat().st_size


def test_token_prompt_once_then_works(page, tmp_path) -> None:  # noqa: ANN001
    gw = GatewayProcess(tmp_path / "home", token="s3cret-token").start()
    try:
        deploy(gw, tmp_path / "functions", "guarded", ECHO)
        open_dashboard(page, gw)
        modal = page.locator("#token-modal")
        expect(modal).to_be_visible()
        expect(page.locator("#token-error")).to_be_hidden()
        page.locator("#token-input").fill("wrong")
        page.locator("#token-submit").click()
        # Refused: asked again, saying so.
        expect(modal).to_be_visible()
        expect(page.locator("#token-error")).to_be_visible()
        page.locator("#token-input").fill("s3cret-token")
        page.locator("#token-submit").click()
        expect(modal).to_be_hidden()
        expect(function_row(page, "guarded")).to_have_attribute("data-status", "Ready")
        assert page.evaluate("sessionStorage.getItem('dcf-token')") == "s3cret-token"

        # Kept for the tab: a reload does not ask again, and writes carry the token too.
        page.reload()
        expect(function_row(page, "guarded")).to_have_attribute("data-status", "Ready")
        open_dashboard(page, gw, "#/function/guarded")
        page.locator("#scale-max").fill("2")
        page.locator("#scale-apply").click()
        expect(page.locator("#scale-message")).to_have_text("Scaled: min 1, max 2.")
        expect(page.locator("#logs")).to_contain_text("[gateway]")
        expect(modal).to_be_hidden()
        with gw.http() as http:
            assert http.get("/system/function/guarded").json()["replicas"]["max"] == 2
    finally:
        gw.stop()


def test_unreachable_gateway_shows_banner_until_back(page, tmp_path) -> None:  # noqa: ANN001
    home = tmp_path / "home"
    gw = GatewayProcess(home).start()
    again = None
    try:
        open_dashboard(page, gw)
        expect(page.locator("#functions-table")).to_contain_text("No functions yet")
        banner = page.locator("#banner-unreachable")
        expect(banner).to_be_hidden()
        gw.stop()
        expect(banner).to_be_visible(timeout=10_000)
        expect(banner).to_contain_text("Gateway unreachable")
        expect(page.locator("#gateway-label")).to_have_text("unreachable")

        # The page keeps retrying: a gateway back on the same address clears the banner.
        again = GatewayProcess(home)
        again.port, again.address, again.url = gw.port, gw.address, gw.url
        again.start()
        expect(banner).to_be_hidden(timeout=10_000)
        expect(page.locator("#functions-table")).to_contain_text("No functions yet")
    finally:
        gw.stop()
        if again is not None:
            again.stop()


def test_environment_values_never_reach_the_page(page, gw, tmp_path) -> None:  # noqa: ANN001
    deploy(gw, tmp_path, "secret-env", ECHO, environment={"API_SECRET": "hunter2-in-the-ui"})
    open_dashboard(page, gw, "#/function/secret-env")
    cell = page.locator('#config-table [data-key="environment.API_SECRET"] dd')
    expect(cell).to_have_text("***")
    expect(cell).to_have_attribute("title", "value hidden by the gateway")
    page.locator("#config-raw").check()
    expect(page.locator("#config-json")).to_contain_text('"API_SECRET": "***"')
    assert "hunter2-in-the-ui" not in page.content()


def test_a_rollout_on_the_function_row_and_page(page, gw, tmp_path) -> None:  # noqa: ANN001
    plan = {"steps": [25, 100], "interval": "60s", "min_calls": 1000}
    deploy(gw, tmp_path, "canaried", ECHO)
    deploy(gw, tmp_path, "canaried", ECHO + "\n# v2\n", update=True, rollout=plan)
    open_dashboard(page, gw)
    bar = function_row(page, "canaried").locator(".rollout")
    expect(bar).to_have_attribute("data-share", "25")
    expect(bar.locator(".rollout-label")).to_have_text("v1 75% · v2 25%")
    expect(bar.locator(".rollout-canary")).to_have_attribute("style", "width: 25%")
    open_dashboard(page, gw, "#/function/canaried")
    detail = page.locator("#rollout")
    expect(detail).to_contain_text("Canary v2 at 25% of calls · step 1 of 2 (25% → 100%)")
    expect(detail.locator(".rollout-label")).to_have_text("v1 75% · v2 25%")
    expect(detail.locator(".rollout-window")).to_contain_text("canary v2 0 calls, 0 errors")
    gw.dcf("function", "abort", "canaried", check=True)
    expect(detail).to_have_count(0)
    expect(page.locator("#last-error")).to_contain_text("canary v2 aborted by hand")
    open_dashboard(page, gw)
    note = function_row(page, "canaried").locator(".rollout-note")
    expect(note).to_have_text("v2 aborted")
    expect(note).to_have_attribute("title", "canary v2 aborted by hand")
    gw.dcf("function", "delete", "canaried", check=True)

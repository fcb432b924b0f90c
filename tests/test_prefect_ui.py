"""The Prefect UI shows featx: schedules, the pipeline's parameter form, the run's artifacts.

Headless Chromium from the OS (`apt-get install chromium`) driven by Playwright, on the real
server, `featx serve` and pipeline run shared with test_prefect_server.py. The UI is a
single-page app, so every check waits for text to appear (bounded), never sleeps. Requests to
anything but the test server are blocked. Screenshots go to $FEATX_SCREENSHOTS (or tmp).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from prefect_fixtures import RUN_NAME, STAGES

pytest_plugins = ["prefect_fixtures"]
pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("FEATX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000  # first load of the UI bundle on a busy 2-core machine takes ~10 s


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (never `playwright install`)"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or FEATX_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, prefect_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    # Only the test server: the UI's own telemetry and links never leave the machine.
    own = re.escape(prefect_server.url + "/")
    context.route(re.compile(f"^(?!{own})"), lambda route: route.abort())
    p = context.new_page()
    try:
        yield p
    finally:
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("FEATX_SCREENSHOTS")
    out = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _snap(page, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def _deployment_link(page, name: str):
    return page.locator("main a[href*='/deployments/deployment/']", has_text=name).first


def _artifact_card(page, description: str):
    return page.locator("main a[href*='/artifacts/artifact/']", has_text=description).first


def _open_deployments(page, prefect_server):
    """From the UI's home page to Deployments in the sidebar, once it lists featx's four."""
    from playwright.sync_api import expect

    page.goto(prefect_server.url + "/")
    page.get_by_role("link", name="Deployments", exact=True).first.click()
    table = page.locator("main")
    for stage in STAGES:
        expect(table).to_contain_text(f"featx-{stage}")
    return table


def test_deployments_page_lists_featx_schedules(page, prefect_server, featx_served, shots):
    from playwright.sync_api import expect

    listing = _open_deployments(page, prefect_server)
    # Cron descriptions of DEFAULT_CRON: ingest hourly, train 02:00, extract 04:00.
    for text in ("Every hour", "At 02:00 AM", "At 04:00 AM"):
        expect(listing).to_contain_text(text)
    _snap(page, shots, "1-deployments")

    _deployment_link(page, "featx-pipeline").click()
    expect(page.locator("main")).to_contain_text("At 03:00 AM, only on Sunday")  # weekly
    expect(page.locator("main")).to_contain_text("flows/pipeline.py:pipeline_flow")
    _snap(page, shots, "2-pipeline-deployment")


def test_custom_run_form_shows_pipeline_config(page, prefect_server, featx_served, shots):
    from playwright.sync_api import expect

    from featx.pipeline import PipelineConfig

    _open_deployments(page, prefect_server)
    _deployment_link(page, "featx-pipeline").click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()

    form = page.locator("main")
    expect(form).to_contain_text("Parameters")
    # One input per PipelineConfig field, titled as pydantic titles it ("batch_size": "Batch Size").
    for name, field in PipelineConfig.model_fields.items():
        expect(form).to_contain_text(name.replace("_", " ").title())
        if field.description:
            expect(form).to_contain_text(field.description)
    expect(form).to_contain_text("cnn")  # the model select shows its default
    # The inputs hold the served deployment's parameters: its folders and the defaults.
    workdir = str(featx_served.workdir.resolve())
    page.wait_for_function(
        "want => [...document.querySelectorAll('main input, main textarea')]"
        ".some(e => e.value === want)",
        arg=workdir,
    )
    values = page.locator("main input, main textarea").evaluate_all("els => els.map(e => e.value)")
    assert str(featx_served.src.resolve()) in values, values
    defaults = PipelineConfig.model_fields
    for name in ("preset", "workers", "patience", "shard_samples"):
        assert str(defaults[name].default) in values, (name, values)
    _snap(page, shots, "3-custom-run-form")


def test_flow_run_page_shows_pipeline_artifacts(page, prefect_server, pipeline_run, shots):
    from playwright.sync_api import expect

    page.goto(prefect_server.url + "/")
    page.get_by_role("link", name="Runs", exact=True).first.click()
    page.get_by_role("link", name=RUN_NAME, exact=True).first.click()
    main = page.locator("main")
    expect(main).to_contain_text("Completed")
    expect(main).to_contain_text("featx-pipeline")

    page.get_by_role("tab", name="Artifacts").click()
    for key in ("featx-pipeline", "featx-classes", "featx-ingest", "featx-features"):
        expect(main).to_contain_text(key)
    expect(main).to_contain_text("Pipeline report")
    _snap(page, shots, "4-flow-run-artifacts")

    # The pipeline report, rendered from markdown.
    _artifact_card(page, "Pipeline report").click()
    expect(main).to_contain_text("featx pipeline: image from")
    for text in ("ingest", "train", "extract", "probe", "accuracy", "random-init baseline"):
        expect(main).to_contain_text(text)
    expect(main).to_contain_text(str(pipeline_run.workdir / "features"))
    _snap(page, shots, "5-pipeline-report-artifact")

    # The per-class table.
    page.go_back()
    _artifact_card(page, "Per-class counts").click()
    expect(main).to_contain_text("probe accuracy")
    for name in ("red", "blue"):
        expect(page.get_by_role("cell", name=name, exact=True)).to_be_visible()
    _snap(page, shots, "6-classes-table-artifact")

    # The features: the map (and, for images, the neighbour grid) drawn from inline PNGs, and
    # the near-duplicate summary.
    page.go_back()
    _artifact_card(page, "Map of the features").click()
    expect(main).to_contain_text("Map of")
    expect(main).to_contain_text("Near-duplicates:")
    for alt in ("map", "neighbours"):
        img = main.locator(f"img[alt='{alt}']").first
        expect(img).to_be_visible()
        assert img.get_attribute("src").startswith("data:image/png;base64,"), alt
        size = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert min(size) > 100, (alt, size)  # decoded, not a broken-image icon
    _snap(page, shots, "7-features-artifact")

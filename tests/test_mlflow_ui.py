"""The MLflow UI shows the sweep: headless Chromium opens the experiment page of the session's
MLflow server and saves a screenshot of it (the sweep of tests/test_sweep_e2e.py)."""

from __future__ import annotations

import shutil

import pytest
from test_sweep_e2e import EXPERIMENT, run_shared_sweep

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(shutil.which("chromium") is None,
                       reason="Debian chromium is not installed (apt-get install -y chromium)"),
]


@pytest.fixture(scope="session")
def swept(ray_local, mlflow_server, s3_server, tmp_path_factory):
    """The session's one sweep, shared with tests/test_sweep_e2e.py."""
    return run_shared_sweep(mlflow_server, tmp_path_factory.mktemp("sweep"), s3_server)


def test_experiment_page_shows_the_sweep_runs(swept, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    from mlflow import MlflowClient

    experiment = MlflowClient(swept.uri).get_experiment_by_name(EXPERIMENT)
    names = ["e2e"] + [r.run_name for r in swept.summary.trials]
    screenshot = tmp_path / "mlflow_experiment.png"
    with sync_api.sync_playwright() as playwright:
        # A fresh profile (user data dir) per run: no state from an earlier browser.
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            page = browser.new_page()
            # The experiment's "Training runs" table (its default page is the GenAI overview).
            page.goto(f"{swept.uri}/#/experiments/{experiment.experiment_id}/runs",
                      wait_until="domcontentloaded", timeout=120_000)
            page.get_by_text("e2e", exact=True).first.wait_for(timeout=120_000)
            # Child runs are folded under their parent: unfold them (the [+] in the name cell).
            expand = page.locator('[role=row] button[data-component-id*="runnamecellrenderer"]')
            for i in range(expand.count()):
                expand.nth(i).click()
            page.get_by_text(names[-1], exact=True).first.wait_for(timeout=30_000)
            assistant = page.get_by_role("button", name="Close")
            if assistant.count():  # the assistant panel would cover the table's columns
                assistant.first.click()
            page.screenshot(path=str(screenshot), full_page=True)
            text = page.inner_text("body")
        finally:
            browser.close()
    for name in names:
        assert name in text, f"{name} is not on the experiment page"
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size[0] >= 1600
    print(f"screenshot of the experiment page: {screenshot}")

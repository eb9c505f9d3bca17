"""The MLflow UI in a real browser (headless Chromium): the link the study prints opens on its runs."""
from __future__ import annotations

import contextlib
import re
import shutil

import pytest
from mlflow import MlflowClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from study_helpers import parent_runs, run_study, start_mlflow_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@contextlib.contextmanager
def headless_chromium():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield browser
    finally:
        browser.quit()


def page_text(browser) -> str:
    return browser.execute_script("return document.body.innerText")


def test_the_printed_link_opens_the_runs_page_with_the_trials_nested_and_their_val_loss_charted(
        workdir, corpus_file, capsys, tmp_path):
    assert run_study("--trials", "2", "--pruner", "none", "--data", corpus_file) == 0
    out = capsys.readouterr().out
    link = re.search(r"then open (http://127\.0\.0\.1:5000/\S+)", out)
    assert link, out
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    (parent,) = parent_runs(MlflowClient(store), "smoke-verse")
    with start_mlflow_server(tmp_path / "server", store) as url, headless_chromium() as browser:
        browser.get(link.group(1).replace("http://127.0.0.1:5000", url))
        wait = WebDriverWait(browser, 90, poll_frequency=0.25)  # generous: megabytes of UI scripts, a busy machine
        # The runs table opens on the study's run, its trials folded under it.
        expander = wait.until(lambda b: b.find_element(
            By.XPATH, f"//a[contains(@href, '/runs/{parent.info.run_id}')]/ancestor::div[@role='gridcell']//button"))
        assert browser.title.startswith("Runs - Experiment")
        expander.click()
        wait.until(lambda b: {"smoke-verse", "trial-000", "trial-001"} <= set(page_text(b).split()))
        # The charts view draws each trial's val_loss curve, and its system metrics.
        browser.find_element(By.XPATH, "//input[@name='runs-view-mode'][@value='CHART']/ancestor::label").click()
        search = wait.until(lambda b: b.find_element(By.XPATH, "//input[@placeholder='Search metric charts']"))
        search.send_keys("val_loss")
        wait.until(lambda b: {"trial-000 (val_loss)", "trial-001 (val_loss)"} <= set(page_text(b).splitlines()))
        search.send_keys(Keys.CONTROL, "a")  # clear() bypasses React's change event
        search.send_keys("cpu_utilization")
        wait.until(lambda b: "system/cpu_utilization_percentage" in page_text(b).splitlines())

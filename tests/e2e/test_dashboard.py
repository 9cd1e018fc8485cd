"""The dashboard in a real headless Chromium against `heimdall up`: submit, watch, pause, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from shared.settings import Settings
from tests.processes import API, Service, free_port, settings_env, wait_healthy

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromedriver are not installed (.ci/run installs them)",
)
EPOCHS = 6
TINY = '{"accelerator": "cpu", "dataset": {"samples": 64, "n_mels": 16, "frames": 16}}'
KEY = uuid.uuid4().hex  # the api runs with an operator key, as it would in production
# Every status the page shows, in order, from now on (without a reload).
WATCH_STATUS = """
window.statuses = [];
const badge = document.getElementById('d-status');
new MutationObserver(() => {
  if (window.statuses.at(-1) !== badge.textContent) window.statuses.push(badge.textContent);
}).observe(badge, {childList: true, characterData: true, subtree: true});
"""
POINTS = "const c = document.getElementById('chart-loss'); return c.data ? c.data[0].x.length : 0"
# The paths Swagger UI lists (it puts zero-width spaces in them to let them wrap).
DOC_PATHS = """return [...document.querySelectorAll('.opblock-summary-path')]
  .map(e => e.innerText.replace(/\\u200b/g, ''))"""
X_TICKS = "return [...document.querySelectorAll('#chart-loss .xtick text')].map(t => t.textContent)"
# A step message as the hub sends it, for the chosen job.
STEP = """onJobEvent({event: 'training_step', job_id: state.selected, data: {epoch: 1,
  total_epochs: 2, step: 3, steps_per_epoch: 4, loss: 0.5, samples_per_second: 0.76}})"""
# How far the Created cell of the first job row reaches, and whether its text is cut.
CREATED = """const cell = document.querySelector('#jobs-body tr td.created');
const side = document.getElementById('side').getBoundingClientRect();
return {text: cell.innerText, clipped: cell.scrollWidth > cell.clientWidth,
        outside: cell.getBoundingClientRect().right > side.right}"""


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `heimdall up` for the module's tests: each test owns its job names."""
    tmp_path = tmp_path_factory.mktemp("up")
    port = free_port()
    settings = Settings(data_dir=tmp_path / "var", poll_seconds=0.05)
    keys = f"dashboard:{KEY}:operator"
    env = settings_env(settings, api_port=port, api_host="127.0.0.1", api_keys=keys)
    service = Service("up", env, tmp_path, "up").start()
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            wait_healthy(client)
        yield url
    finally:
        service.stop()
        print(service.log()[-3000:])


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1100")
    # No network but the api's: any other host name fails to resolve.
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The dashboard as a person uses it: by element ids, waiting for what the page shows."""

    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver, self.url = driver, url

    def text(self, element_id: str) -> str:
        return str(self.driver.find_element(By.ID, element_id).text)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        waiter = WebDriverWait(self.driver, timeout, poll_frequency=0.1)
        return waiter.until(lambda _: condition(), f"timed out waiting for {what}")

    def fill(self, **fields: str) -> None:
        for element_id, value in fields.items():
            field = self.driver.find_element(By.ID, element_id)
            field.clear()
            field.send_keys(value)

    def click(self, element_id: str) -> None:
        self.driver.find_element(By.ID, element_id).click()

    def showing(self, element_id: str, part: str) -> str | None:
        """The element's text once it contains `part`."""
        text = self.text(element_id)
        return text if part in text else None

    def job_socket(self) -> str:
        """The URL of the chosen job's current WebSocket."""
        return str(self.driver.execute_script("return state.socket.ws.url"))

    def points(self) -> int:
        return int(self.driver.execute_script(POINTS))

    def status(self) -> str:
        return self.text("d-status")

    def showing_in_body(self, part: str) -> bool:
        return part in str(self.driver.find_element(By.TAG_NAME, "body").text)

    def enabled(self, element_id: str) -> bool:
        return bool(self.driver.find_element(By.ID, element_id).is_enabled())

    def value(self, element_id: str) -> str:
        return str(self.driver.find_element(By.ID, element_id).get_attribute("value"))

    def visible(self, element_id: str) -> bool:
        return bool(self.driver.find_element(By.ID, element_id).is_displayed())


def open_dashboard(driver: WebDriver, url: str) -> Page:
    """The page as a user with a key opens it: `?token=` (it then sends it as a Bearer)."""
    page = Page(driver, url)
    driver.get(f"{url}/?token={KEY}")
    page.wait(lambda: page.text("live") == "live", "the page's live socket")
    page.wait(lambda: page.value("f-epochs"), "the form's defaults from the api's schema")
    return page


def submit(page: Page, name: str, epochs: str) -> None:
    page.driver.find_element(By.TAG_NAME, "summary").click()
    page.fill(**{"f-name": name, "f-epochs": epochs, "f-batch": "16", "f-lr": "0.002"})
    page.fill(**{"f-extra": TINY})
    page.click("f-submit")


def test_a_bad_value_shows_the_field_named_and_changes_nothing(
    base_url: str, browser: WebDriver
) -> None:
    page = open_dashboard(browser, base_url)
    name = f"bad-{uuid.uuid4().hex[:6]}"
    submit(page, name, "0")
    result = page.wait(lambda: page.showing("submit-result", "422"), "the api's error")
    assert "config.epochs" in result and "greater than or equal to 1" in result, result
    assert "invalid" in str(browser.find_element(By.ID, "f-epochs").get_attribute("class"))
    auth = {"Authorization": f"Bearer {KEY}"}
    jobs = httpx.get(f"{base_url}{API}/jobs", headers=auth).json()["jobs"]
    assert name not in [job["job_name"] for job in jobs]


def test_without_a_key_the_page_says_how_to_give_one(base_url: str, browser: WebDriver) -> None:
    page = Page(browser, base_url)
    browser.get(base_url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    shown = page.wait(lambda: page.showing("list-error", "401"), "the api's 401")
    assert "?token=" in shown, shown


def test_submit_watch_pause_resume_to_completion(
    base_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    page = open_dashboard(browser, base_url)
    browser_errors(browser)  # what earlier tests provoked is theirs
    assert_the_form_has_the_apis_defaults(page, base_url)
    name = f"dash-{uuid.uuid4().hex[:6]}"
    submit(page, name, str(EPOCHS))
    page.wait(lambda: page.text("d-name") == name, "the new job to be chosen")
    first = page.wait(page.points, "the first epoch on the chart", timeout=60)
    page.wait(lambda: page.points() > first, "the chart to grow")
    progress = page.wait(lambda: page.showing("d-progress", "step "), "step telemetry")
    assert f"of {EPOCHS}" in progress and "loss" in progress, progress

    assert page.enabled("pause") and page.enabled("cancel") and not page.enabled("resume")
    browser.execute_script(WATCH_STATUS)
    page.click("pause")
    page.wait(lambda: page.status() == "paused", "the job to pause")
    assert "pause requested" in page.text("d-message")
    paused_at = page.points()
    assert paused_at < EPOCHS, "the job finished before it could be paused: raise EPOCHS"
    page.wait(lambda: page.showing("jobs-body", "paused"), "the job list to show paused")
    page.wait(lambda: page.enabled("resume"), "resume to be offered")
    assert not page.enabled("pause")

    page.click("resume")
    # A dropped socket: the page reconnects by itself with ?after= and misses no epoch.
    browser.execute_script("state.socket.ws.close()")
    page.wait(lambda: "after=" in page.job_socket(), "the page to reconnect with ?after=")
    assert f"token={KEY}" in page.job_socket()
    page.wait(lambda: page.status() == "completed", "the job to complete", timeout=90)
    shown = browser.execute_script("return window.statuses")  # gone, had the page reloaded
    assert in_order(shown, ["paused", "queued", "running", "completed"]), shown
    page.wait(lambda: page.points() == EPOCHS, "every epoch on the chart")
    page.wait(lambda: page.showing("jobs-body", "completed"), "the job list to show completed")
    screenshot(browser, tmp_path)

    page.wait(lambda: not any(page.enabled(v) for v in ("pause", "resume", "cancel")), "no command")
    assert_the_page_shows_numbers_for_people(page)
    assert_the_models_download_with_the_key_in_a_header(page, tmp_path)
    assert_only_the_api_was_reached(browser, base_url)


def assert_the_form_has_the_apis_defaults(page: Page, base_url: str) -> None:
    schema = httpx.get(f"{base_url}/openapi.json").json()["components"]["schemas"]
    defaults = schema["JobConfig"]["properties"]
    for element_id, name in (
        ("f-epochs", "epochs"),
        ("f-batch", "batch_size"),
        ("f-lr", "learning_rate"),
    ):
        assert float(page.value(element_id)) == defaults[name]["default"], element_id
    assert page.value("f-arch") == defaults["model_architecture"]["default"]


def assert_the_page_shows_numbers_for_people(page: Page) -> None:
    """Whole epochs on the charts, a date and a time that fit, 0.76 samples/s as such."""
    ticks = page.driver.execute_script(X_TICKS)
    assert ticks and all(re.fullmatch(r"\d+", tick) for tick in ticks), ticks
    created = page.driver.execute_script(CREATED)
    assert re.search(r"\d{1,2}:\d{2}", created["text"]) and re.search(r"\d{4}", created["text"])
    assert not created["clipped"] and not created["outside"], created
    page.driver.execute_script(STEP)
    assert "0.76 samples/s" in page.text("d-progress"), page.text("d-progress")


def assert_the_models_download_with_the_key_in_a_header(page: Page, folder: Path) -> None:
    downloads = folder / "downloads"
    downloads.mkdir()
    behaviour = {"behavior": "allow", "downloadPath": str(downloads)}
    page.driver.execute_cdp_cmd("Browser.setDownloadBehavior", behaviour)
    assert page.visible("download-model") and page.visible("download-export")
    for element_id, suffix in (("download-model", ".pt"), ("download-export", ".heimdall")):
        page.click(element_id)
        saved = page.wait(partial(finished, downloads, suffix), f"the {suffix} file", 60)
        assert saved.stat().st_size > 1000, saved
    assert "token=" not in str(
        page.driver.find_element(By.ID, "download-model").get_attribute("href")
    )


def finished(folder: Path, suffix: str) -> Path | None:
    """The downloaded file ending in `suffix`, once Chromium has finished writing it."""
    found = [p for p in folder.iterdir() if p.name.endswith(suffix)]
    return found[0] if found else None


def test_the_newest_job_is_chosen_on_first_load_and_its_parent_shown(
    base_url: str, browser: WebDriver
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    parent = submit_over_rest(base_url, f"parent-{uuid.uuid4().hex[:6]}", {})
    wait_for_status(base_url, parent["id"], "completed")
    child = submit_over_rest(base_url, f"child-{uuid.uuid4().hex[:6]}", {"init_from": parent["id"]})
    newest = httpx.get(f"{base_url}{API}/jobs", params={"limit": 1}, headers=auth).json()
    assert newest["jobs"][0]["id"] == child["id"]
    page = open_dashboard(browser, base_url)  # no #job= in the URL
    page.wait(lambda: page.text("d-name") == child["job_name"], "the newest job to be chosen")
    page.wait(lambda: page.showing("d-parent", parent["job_name"]), "the job's parent")
    page.click("d-parent-link")
    page.wait(lambda: page.text("d-name") == parent["job_name"], "the parent to be chosen")
    assert_only_the_api_was_reached(browser, base_url)


def submit_over_rest(base_url: str, name: str, config: dict[str, Any]) -> dict[str, Any]:
    body = {"job_name": name, "config": {"epochs": 1, **json.loads(TINY), **config}}
    auth = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{base_url}{API}/jobs", json=body, headers=auth, timeout=30)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_for_status(base_url: str, job_id: str, status: str, timeout: float = 90) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + timeout
    while (
        httpx.get(f"{base_url}{API}/jobs/{job_id}", headers=auth).json()["job"]["status"] != status
    ):
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        time.sleep(0.2)


def test_the_api_docs_load_with_no_network(base_url: str, browser: WebDriver) -> None:
    page = Page(browser, base_url)
    browser.get(f"{base_url}/docs")
    paths = page.wait(lambda: browser.execute_script(DOC_PATHS), "Swagger UI to list the routes")
    for path in ("/jobs", "/jobs/{job_id}", "/jobs/{job_id}/pause", "/jobs/{job_id}/model"):
        assert API + path in paths, paths
    assert_only_the_api_was_reached(browser, base_url)
    browser.get(f"{base_url}/redoc")
    page.wait(lambda: page.showing_in_body("Pause"), "ReDoc to list the operations")
    assert_only_the_api_was_reached(browser, base_url)


def in_order(seen: list[str], expected: list[str]) -> bool:
    """`expected` is a subsequence of `seen`."""
    remaining = iter(seen)
    return all(any(s == e for s in remaining) for e in expected)


def screenshot(driver: WebDriver, tmp_path: Path) -> None:
    driver.save_screenshot(str(tmp_path / "dashboard.png"))
    if target := os.environ.get("HEIMDALL_SCREENSHOT"):
        driver.save_screenshot(target)


def assert_only_the_api_was_reached(driver: WebDriver, base_url: str) -> None:
    loaded = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded and all(url.startswith(base_url + "/") for url in loaded), loaded
    assert not browser_errors(driver)


def browser_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """Script errors and CSP refusals since the last call (4xx answers are "network")."""
    logged: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e for e in logged if e["level"] == "SEVERE" and e["source"] != "network"]

"""The dashboard (`/ui`) in a real headless Chromium, driven by Selenium with Debian's chromedriver:
a job submitted over HTTP to a real API (uvicorn) and a real Celery worker, found in the jobs list,
followed live on its page (the loss curve grows as epochs arrive over server-sent events) until
it succeeds; then its comparison table, per-class accuracy, downloads and predict form."""

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from selenium.common.exceptions import TimeoutException
from selenium.webdriver import Chrome, ChromeOptions
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from app.datasets.loading import load_builtin
from app.main import create_app
from app.ui import MEDIA_TYPES, STATIC
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.servers import serving
from tests.helpers.stacks import Stack
from tests.helpers.teachers import TeacherFiles
from tests.helpers.workers import StartWorker

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
EPOCHS = 8
# The lead's copies of the screenshots, next to those in the test's own tmp dir.
SCREENSHOT_COPY = Path("/tmp/dashboard.png")
JOBS_SCREENSHOT_COPY = Path("/tmp/dashboard-jobs.png")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chrome]:
    """Headless Chromium through the system's chromedriver: both paths given, so Selenium
    Manager has nothing to find or download."""
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options = ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Chrome, what: str, check: Callable[[Chrome], object]) -> object:
    try:
        return WebDriverWait(driver, 90, poll_frequency=0.05).until(check)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}: {page_state(driver)}") from None


def page_state(driver: Chrome) -> str:
    return str(
        driver.execute_script(
            "return [document.body.dataset.status, "
            "document.getElementById('loss-chart')?.dataset.points, "
            "document.getElementById('error')?.textContent]"
        )
    )


def points(driver: Chrome) -> int:
    return int(driver.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0)


# One stack is enough for the pages; the API they call runs on both in the other tests.
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_dashboard_is_served(client: TestClient) -> None:
    """The pages and their files, and nothing else under /ui; none of it in the OpenAPI."""
    for path in ("/ui", "/ui/jobs/any-id"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache"
    assert {p.name for p in STATIC.iterdir() if p.is_file()} == set(MEDIA_TYPES)
    for name, media_type in MEDIA_TYPES.items():
        response = client.get(f"/ui/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"] == media_type
    assert "/ui/static/uPlot.iife.min.js" in client.get("/ui/jobs/x").text
    for missing in ("/ui/static/app.py", "/ui/static/..%2F__init__.py", "/ui/nothing"):
        response = client.get(missing)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
    assert not [path for path in client.get("/openapi.json").json()["paths"] if "/ui" in path]


@pytest.mark.e2e
@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_dashboard_follows_a_job_live(
    stack: Stack,
    client: TestClient,
    digits_teacher: TeacherFiles,
    start_worker: StartWorker,
    browser: Chrome,
    tmp_path: Path,
) -> None:
    start_worker()
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(
        teacher["id"], training={"epochs": EPOCHS, "batch_size": 32, "learning_rate": 0.01}
    )
    job_id = client.post("/v1/jobs", json=body).json()["id"]

    with serving(create_app()) as address:
        browser.get(f"http://{address}/ui")
        link = wait_until(
            browser,
            "the job in the list",
            lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"] a'),
        )
        browser.save_screenshot(str(tmp_path / "jobs.png"))
        shutil.copyfile(tmp_path / "jobs.png", JOBS_SCREENSHOT_COPY)
        link.click()  # type: ignore[attr-defined]
        assert browser.current_url.endswith(f"/ui/jobs/{job_id}")

        # Live: the loss curve has two epochs, then more, while the job runs.
        wait_until(browser, "two epochs on the loss curve", lambda d: points(d) >= 2)
        first = points(browser)
        status = browser.find_element(By.TAG_NAME, "body").get_attribute("data-status")
        assert first < EPOCHS and status in ("running", "queued"), (first, status)
        wait_until(browser, "the loss curve growing", lambda d: points(d) > first)
        assert browser.find_elements(By.CSS_SELECTOR, "#loss-chart canvas")
        assert browser.find_elements(By.CSS_SELECTOR, "#accuracy-chart canvas")

        wait_until(
            browser,
            "the job's success",
            lambda d: (
                d.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "succeeded"
            ),
        )
        wait_until(
            browser,
            "the predict form",
            lambda d: d.find_element(By.ID, "predict-input").get_attribute("value"),
        )
        assert points(browser) == EPOCHS
        assert (
            int(browser.find_element(By.ID, "accuracy-chart").get_attribute("data-points") or 0)
            == EPOCHS
        )
        job = client.get(f"/v1/jobs/{job_id}").json()
        result = job["result"]

        rows = {
            row.find_element(By.TAG_NAME, "th").text: [
                cell.text for cell in row.find_elements(By.TAG_NAME, "td")
            ]
            for row in browser.find_elements(By.CSS_SELECTOR, "#comparison tbody tr")
        }
        teacher_accuracy, student_accuracy, _ = rows["Accuracy (test)"]
        assert teacher_accuracy == f"{100 * result['teacher_accuracy']:.2f} %"
        assert student_accuracy == f"{100 * result['student_accuracy']:.2f} %"
        assert rows["Parameters"][1] == f"{result['student_parameters']:,}"
        assert rows["Latency"][1].endswith(" ms") and rows["Size (ONNX)"][1] != "–"
        if result["int8_accuracy"] is not None:
            assert rows["Accuracy (test)"][2] == f"{100 * result['int8_accuracy']:.2f} %"
        per_class = browser.find_elements(By.CSS_SELECTOR, "#per-class tbody tr")
        assert [row.find_element(By.TAG_NAME, "td").text for row in per_class] == [
            str(i) for i in range(10)
        ]
        downloads = [
            a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")
        ]
        assert f"http://{address}/v1/jobs/{job_id}/artifact?format=onnx" in downloads

        # Predict one test digit; the page shows the label the API gives for it.
        digits = load_builtin("builtin:digits").x_test
        assert isinstance(digits, np.ndarray)
        sample = digits[0].tolist()
        expected = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [sample]}).json()
        browser.execute_script(
            "document.getElementById('predict-input').value = arguments[0]", json.dumps(sample)
        )
        browser.find_element(By.ID, "predict-submit").click()
        output = browser.find_element(By.ID, "predict-output")
        wait_until(browser, "a prediction", lambda d: output.get_attribute("data-label"))
        assert output.get_attribute("data-label") == expected["labels"][0]
        assert output.text.startswith(f"Predicted: {expected['labels'][0]} (probability")

        errors = [
            entry
            for entry in browser.get_log("browser")  # type: ignore[no-untyped-call]
            if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
        ]
        assert errors == []

        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, int(height) + 200)
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)  # the charts redraw at the new size
        screenshot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(screenshot))
        shutil.copyfile(screenshot, SCREENSHOT_COPY)

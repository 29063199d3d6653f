"""The dashboard (`/ui`) in a real headless Chromium, driven by Selenium with Debian's chromedriver:
a job submitted over HTTP to a real API (uvicorn) and a real Celery worker, found in the jobs list,
followed live on its page (the loss curve grows as epochs arrive over server-sent events, read
with fetch) until it succeeds; then its comparison table, per-class accuracy, downloads (fetched,
saved under the server's file name) and predict form. With API keys required, the pages ask for
one, and work once it is saved."""

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from selenium.common.exceptions import TimeoutException
from selenium.webdriver import Chrome, ChromeOptions
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from app.auth import create_key
from app.datasets.loading import load_builtin
from app.db import session_scope
from app.main import create_app
from app.models import KeyRole
from app.ui import MEDIA_TYPES, STATIC
from app.ui import router as ui_router
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.servers import serving
from tests.helpers.stacks import Stack, clear_caches
from tests.helpers.teachers import TeacherFiles
from tests.helpers.workers import StartWorker

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
EPOCHS = 8
# The lead's copies of the screenshots, next to those in the test's own tmp dir.
SCREENSHOT_COPY = Path("/tmp/dashboard.png")
JOBS_SCREENSHOT_COPY = Path("/tmp/dashboard-jobs.png")
KEY_SCREENSHOT_COPY = Path("/tmp/dashboard-key.png")


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
            "return [document.body.dataset.status, document.body.dataset.stream, "
            "document.getElementById('loss-chart')?.dataset.points, "
            "document.getElementById('error')?.textContent]"
        )
    )


def shown_error(driver: Chrome) -> tuple[str | None, str]:
    """The page's error: its code (``data-code``, set for a 401) and text, when shown."""
    error = driver.find_element(By.ID, "error")
    if not error.is_displayed():
        return None, ""
    return error.get_attribute("data-code"), error.text


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


# What the fake event stream sends, connection by connection: bytes, in chunks cut anywhere (in a
# CRLF, in a UTF-8 character); the first connection ends in the middle of event 3, as a dropped
# one would, so the reader must come back with Last-Event-ID 2; the third answer is 204.
FAKE_STREAM = [
    [
        b"\xef\xbb\xbfretry: 50\r",
        b'\n: keep-alive\r\n\r\nid: 1\r\nevent: metrics\r\ndata: {"epoch":',
        b' 1}\r\n\r\nid: 2\revent: status\rdata: {"phase": "caf\xc3',
        b'\xa9"}\r\rid: 3\nevent: metrics\ndata: {"epoch": 3}\n',
    ],
    [b"id: 4\ndata: a\ndata:b\n\nid: 5\nevent: end\ndata: {}\n\n"],
]


def fake_stream_app(seen: list[tuple[str | None, str | None]]) -> FastAPI:
    """The dashboard's pages and, at /fake/events, FAKE_STREAM; ``seen`` gets each request's
    Last-Event-ID and Authorization."""
    app = FastAPI()
    app.include_router(ui_router)

    @app.get("/fake/events")
    async def events(request: Request) -> Response:
        seen.append((request.headers.get("last-event-id"), request.headers.get("authorization")))
        if len(seen) > len(FAKE_STREAM):
            return Response(status_code=204)
        chunks = FAKE_STREAM[len(seen) - 1]

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk
                await asyncio.sleep(0.05)

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


@needs_chromium
def test_event_stream_reader_resumes(browser: Chrome) -> None:
    """The pages' server-sent events reader (fetch, so that it can send the key): fields, CR,
    LF and CRLF line ends cut across chunks, a UTF-8 character cut in two, comments, multi-line
    data; a connection that ends early is taken up again with Last-Event-ID; a 204 ends it."""
    seen: list[tuple[str | None, str | None]] = []
    with serving(fake_stream_app(seen)) as address:
        browser.get(f"http://{address}/ui")
        browser.set_script_timeout(30)
        result = browser.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            sessionStorage.setItem("distill.apiKey", "dsk_0123abcd_secret");
            const events = [];
            const states = [];
            eventStream("/fake/events", {
              onEvent: (e) => events.push([e.type, e.data, e.lastEventId]),
              onState: (state) => {
                states.push(state);
                if (state === "closed" || state === "failed") done({ events, states });
              },
              onFailure: (e) => states.push(String(e)),
            });
            """
        )
    assert result["events"] == [
        ["metrics", '{"epoch": 1}', "1"],
        ["status", '{"phase": "café"}', "2"],
        ["message", "a\nb", "4"],
        ["end", "{}", "5"],
    ]
    key = "Bearer dsk_0123abcd_secret"
    assert seen == [(None, key), ("2", key), ("5", key)]
    assert result["states"][:2] == ["connecting", "open"]
    assert result["states"][-1] == "closed" and "reconnecting" in result["states"]


@pytest.mark.e2e
@needs_chromium
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_dashboard_follows_a_job_live(
    stack: Stack,
    client: TestClient,
    digits_teacher: TeacherFiles,
    start_worker: StartWorker,
    browser: Chrome,
    tmp_path: Path,
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    # Batches of 8: about 1 s an epoch here. The worker starts only once the job's page is open
    # (the job waits queued till then): started first, it once ran all 8 epochs before the
    # page had loaded, on a loaded CI machine.
    body = job_body(
        teacher["id"], training={"epochs": EPOCHS, "batch_size": 8, "learning_rate": 0.01}
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
        wait_until(
            browser,
            "the queued job's page, streaming",
            lambda d: d.execute_script(
                "return document.body.dataset.status === 'queued' "
                "&& document.body.dataset.stream === 'open'"
            ),
        )
        start_worker()

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
        # A download goes through fetch (it could carry a key), saved under the server's name.
        saved = tmp_path / "downloads"
        saved.mkdir()
        browser.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(saved)}
        )
        browser.find_element(By.CSS_SELECTOR, '#downloads a[data-format="manifest"]').click()
        manifest_file = saved / f"{job_id}-manifest.json"
        wait_until(browser, "the manifest downloaded", lambda d: manifest_file.is_file())
        assert (
            browser.find_element(
                By.CSS_SELECTOR, '#downloads a[data-format="manifest"]'
            ).get_attribute("data-file")
            == manifest_file.name
        )
        expected_manifest = client.get(f"/v1/jobs/{job_id}/artifact?format=manifest").content
        assert manifest_file.read_bytes() == expected_manifest

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


@pytest.mark.e2e
@needs_chromium
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_dashboard_asks_for_an_api_key(
    stack: Stack,
    client: TestClient,
    digits_teacher: TeacherFiles,
    browser: Chrome,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Keys required: the jobs page says so (the 401's detail, as text) and puts the cursor in
    the key field; a wrong key is refused; the right one, saved, brings the jobs list, and the
    job's page reads the job and its event stream with it (kept in sessionStorage, not
    localStorage); forgotten, the page asks again."""
    monkeypatch.setenv("DISTILL_AUTH", "required")
    clear_caches()
    try:
        with session_scope() as session:
            _, key = create_key(session, "team-a", KeyRole.ADMIN)
        unauthorized = client.get("/v1/jobs")
        assert unauthorized.status_code == 401, unauthorized.text
        client.headers["Authorization"] = f"Bearer {key}"
        teacher = upload_teacher(client, digits_teacher)
        created = client.post("/v1/jobs", json=job_body(teacher["id"]))
        assert created.is_success, created.text
        job_id = created.json()["id"]  # no worker: it stays queued

        with serving(create_app()) as address:
            browser.get(f"http://{address}/ui")
            wait_until(browser, "the 401", lambda d: shown_error(d)[0] == "unauthorized")
            _, text = shown_error(browser)
            assert text.startswith("The server needs an API key"), text
            assert unauthorized.json()["detail"] in text  # the problem's detail, as text
            assert browser.switch_to.active_element.get_attribute("id") == "api-key"
            assert not browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
            browser.save_screenshot(str(tmp_path / "key.png"))
            shutil.copyfile(tmp_path / "key.png", KEY_SCREENSHOT_COPY)

            field = browser.find_element(By.ID, "api-key")
            field.send_keys("dsk_00000000_not-a-key")
            browser.find_element(By.ID, "key-save").click()
            wait_until(browser, "the key refused", lambda d: shown_error(d)[0] == "invalid_key")
            assert shown_error(browser)[1].startswith("The server did not accept this API key")

            field.clear()
            field.send_keys(key)
            browser.find_element(By.ID, "key-save").click()
            link = wait_until(
                browser,
                "the job in the list",
                lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"] a'),
            )
            assert shown_error(browser) == (None, "")
            storage = browser.execute_script(
                "return [sessionStorage.getItem('distill.apiKey'), localStorage.length]"
            )
            assert storage == [key, 0]

            link.click()  # type: ignore[attr-defined]
            assert browser.current_url.endswith(f"/ui/jobs/{job_id}")
            wait_until(
                browser,
                "the job and its open event stream",
                lambda d: d.execute_script(
                    "return document.body.dataset.status === 'queued' "
                    "&& document.body.dataset.stream === 'open'"
                ),
            )
            assert browser.find_element(By.ID, "api-key").get_attribute("value") == key

            browser.find_element(By.ID, "key-forget").click()
            wait_until(browser, "the 401 again", lambda d: shown_error(d)[0] == "unauthorized")
            assert browser.execute_script("return sessionStorage.length") == 0
    finally:
        monkeypatch.delenv("DISTILL_AUTH")
        clear_caches()

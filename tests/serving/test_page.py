"""The review page (`GET /`) in a real browser against the real Serve application.

What a person notices: the page loads on its own origin with no errors, says it stores nothing
and is not for diagnosis, shows the served model's card; an X-ray gets its label, probability
against the threshold (the same numbers as `POST /predict`) and a heatmap whose opacity the
slider controls; a file the API refuses shows the API's own words; the keyboard reaches every
control; a phone-sized window needs no sideways scrolling.

Playwright drives the system Chromium (`apt-get install chromium`), never a browser it downloads;
the module skips where either is missing. One Serve deployment and one browser serve the module.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.test_dicom import bright_top, make_dicom
from tests.helpers import real_data
from tests.serving.test_serving import request
from tests.serving.test_serving_ood import INSIDE, OUTSIDE, export_guarded
from tests.serving.test_serving_ops import _export, serve_port  # noqa: F401  (Serve on a free port, per module)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright is not installed (pip install -e '.[test]'); the page tests need it",
                allow_module_level=True)

# $PNEUMONIA_CHROMIUM names another build (a Chrome, a Chromium elsewhere); else the system's.
CHROMIUM = os.environ.get("PNEUMONIA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium binary for the page tests; install it: apt-get install chromium "
                "(or set PNEUMONIA_CHROMIUM)", allow_module_level=True)

# Headless, and quiet on the network: the test asserts the page itself asks no other origin.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_MS = 180_000  # the first /explain traces Grad-CAM; a busy 2-core machine may take a while
MARKUP_NAME = "<img src=x onerror=alert(1)>.png"
NOTES = b"Ward round notes: re-check bed 4 tomorrow.\nNot an image at all.\n"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# A small grey picture the test model classifies (it has no out-of-distribution guard).
GRADIENT = _png(np.tile(np.linspace(30, 220, 96, dtype=np.uint8), (80, 1)))
# A 16-bit DICOM X-ray (what a hospital's PACS sends).
DICOM = make_dicom(bright_top(rows=80, columns=64))


def _predict_file(url: str, name: str, data: bytes) -> tuple[int, dict]:
    """`POST /predict` of one multipart file, as the page sends it (so the message names the file)."""
    boundary = "page-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return request(f"{url}/predict", body, f"multipart/form-data; boundary={boundary}")


@pytest.fixture(scope="module")
def app_url(serve_port, tmp_path_factory):  # noqa: F811  (the imported fixture)
    from ray import serve

    from pneumonia.serving import build_app

    artifact = _export(tmp_path_factory.mktemp("page") / "registry", width=8)
    serve.run(build_app({"artifact": str(artifact.path)}), name="page", route_prefix="/")
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="module")
def browser(app_url):  # after Serve is up: Playwright's sync API wants no asyncio loop of its own
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


class Page:
    """One browser tab on the page, recording what a reviewer never wants: console errors,
    uncaught exceptions and requests to any other origin."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 800):
        self.url = url
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.set_default_timeout(20_000)  # a missing element fails in seconds, not minutes
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        self.page.on("request", lambda request: self.requests.append(request.url))
        try:
            self.page.goto(f"{url}/")
            self.page.get_by_test_id("model-version").wait_for()
        except BaseException:
            self.context.close()  # a page that never loaded leaves no browser context behind
            raise

    def _console(self, message) -> None:
        # The browser logs every 4xx/5xx answer itself; the API's refusals of a file are expected.
        refusal = (message.text.startswith("Failed to load resource: the server responded with a status of")
                   and "/explain" in (message.location or {}).get("url", ""))
        if message.type == "error" and not refusal:
            self.errors.append(f"{message.text} ({(message.location or {}).get('url', '')})")

    def foreign_requests(self) -> list[str]:
        origin = urllib.parse.urlsplit(self.url)[:2]
        return [url for url in self.requests
                if urllib.parse.urlsplit(url)[:2] != origin and not url.startswith(("data:", "blob:"))]

    def upload(self, files: list[dict]) -> None:
        self.page.get_by_test_id("file-input").set_input_files(files)

    def settled(self, name: str):
        """The card of file ``name`` once it is no longer pending."""
        self.page.wait_for_function(
            """name => [...document.querySelectorAll('[data-testid="result-card"]')]
                 .some(card => card.dataset.file === name && card.dataset.state !== 'pending')""",
            arg=name, timeout=ANSWER_MS)
        return self.page.locator(f'[data-testid="result-card"][data-file="{name}"]')

    def screenshot(self, path: Path) -> None:
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")

    def close(self) -> None:
        self.context.close()


def _shown_numbers(text: str) -> tuple[float, float]:
    match = re.fullmatch(r"probability ([0-9.]+) · threshold ([0-9.]+)", text.strip())
    assert match, f"unexpected probability text: {text!r}"
    return float(match.group(1)), float(match.group(2))


def test_the_page_loads_on_its_own_origin_with_its_notices_and_the_served_model(app_url, browser):
    tab = Page(browser, app_url)
    page = tab.page
    try:
        model = json.loads(urllib.request.urlopen(f"{app_url}/model", timeout=30).read())
        card = page.get_by_test_id("model-card")
        assert card.get_by_test_id("model-version").inner_text() == model["version"]
        assert card.get_by_test_id("model-name").inner_text() == model["name"]
        assert model["version"] in page.get_by_test_id("served-model").inner_text()
        assert "pneumonia — review page" in page.title()

        assert page.get_by_test_id("not-diagnostic-notice").is_visible()
        assert "not for diagnostic use" in page.get_by_test_id("not-diagnostic-notice").inner_text().lower()
        assert page.get_by_test_id("no-storage-notice").is_visible()
        assert "nothing you upload is stored" in page.get_by_test_id("no-storage-notice").inner_text().lower()

        # This artifact recorded no validation metrics: the card says so instead of breaking.
        assert card.get_by_test_id("model-precision").inner_text() == "not recorded"
        assert f"{model['threshold']:.4f}" in card.get_by_test_id("model-threshold").inner_text()
        assert page.get_by_test_id("model-warning").is_hidden()  # no warning for this artifact

        assert page.get_by_test_id("drop-zone").is_visible()
        assert tab.errors == [], tab.errors  # CSP violations, failed loads and exceptions show here
        assert tab.foreign_requests() == []
    finally:
        tab.close()


def test_a_complete_model_card_reads_as_words_with_intervals_and_the_warning(app_url, browser):
    """The card of a trained model (the fields a real `GET model` has), answered in the browser
    so that one deployment serves the module."""
    card = {
        "name": "pneumonia-cnn", "version": "v0007", "created": "2026-11-30T07:29:40+00:00",
        "data_fingerprint": "sha256:7f907100b80531eab3c77952ba257df5b5119580277495a46270898a05291199",
        "git_commit": "7127b389319c17ec9a4ef5846b174dff96b76d70", "package_version": "0.1.0",
        "target_recall": 0.95, "threshold": 0.1203,
        "input": {"image_size": 64, "channels": 1, "normalize": "none", "resize": "stretch"},
        "validation_metrics": {
            "accuracy": 0.837, "precision": 0.823, "recall": 0.989, "specificity": 0.43, "roc_auc": 0.93,
            "pr_auc": 0.97, "n": 129,
            "operating_point": {"rule": "lower_bound", "description": "lower end of the 95% CI of validation recall >= 0.95",
                                "met": True, "confidence": 0.95, "threshold": 0.1203, "precision": 0.823,
                                "precision_ci": [0.734, 0.903], "recall": 0.989, "recall_ci": [0.962, 1.0],
                                "specificity": 0.43, "specificity_ci": [0.31, 0.55], "units": 89, "samples": 1000}},
        "ensemble": {"members": 4}, "training_data": {"synthetic": True},
        "warning": "trained on synthetic data: not for real X-rays",
        "training_config": {"model": {"name": "<img src=x onerror=alert(1)>"}},
    }
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.route("**/model", lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(card)))
    try:
        page.goto(f"{app_url}/")
        model = page.get_by_test_id("model-card")
        model.get_by_test_id("model-version").wait_for()
        assert model.get_by_test_id("model-version").inner_text() == "v0007"
        assert model.get_by_test_id("model-precision").inner_text() == "0.82 (95% CI 0.73–0.90)"
        assert model.get_by_test_id("model-recall").inner_text() == "0.99 (95% CI 0.96–1.00)"
        assert model.get_by_test_id("model-specificity").inner_text() == "0.43 (95% CI 0.31–0.55)"
        text = model.inner_text()
        for shown in ("lower end of the 95% CI of validation recall >= 0.95", "4 members", "0.93", "0.97", "129",
                      "7127b389319c17ec9a4ef5846b174dff96b76d70", "sha256:7f907100", "synthetic images"):
            assert shown in text, shown
        warning = page.get_by_test_id("model-warning")
        assert warning.is_visible() and "trained on synthetic data: not for real X-rays" in warning.inner_text()
        assert page.locator("img[src='x']").count() == 0  # metadata is text, never markup
        assert errors == [], errors
    finally:
        context.close()


@pytest.fixture(scope="module")
def real_xray() -> Path:
    """A full-resolution X-ray of the real validation set (skips before Serve starts when absent)."""
    return sorted((real_data("chest_xray_val16") / "PNEUMONIA").glob("*.jpeg"))[0]


def test_a_real_xray_gets_the_apis_label_probability_and_an_adjustable_heatmap(real_xray, app_url, browser, tmp_path):
    xray, data = real_xray, real_xray.read_bytes()
    status, expected = request(f"{app_url}/predict", data, "image/jpeg")
    assert status == 200, expected

    tab = Page(browser, app_url)
    page = tab.page
    try:
        tab.upload([{"name": xray.name, "mimeType": "image/jpeg", "buffer": data}])
        card = tab.settled(xray.name)
        assert card.get_attribute("data-state") == "done", card.inner_text()
        label = card.get_by_test_id("label").inner_text()
        assert label in ("NORMAL", "PNEUMONIA") and label == expected["label"]
        probability, threshold = _shown_numbers(card.get_by_test_id("probability").inner_text())
        assert probability == pytest.approx(expected["probability"], abs=0.005 + 1e-9)
        assert threshold == pytest.approx(expected["threshold"], abs=0.005 + 1e-9)
        assert card.get_by_test_id("gauge").is_visible()
        assert expected["version"] in card.inner_text()

        xray_image, heatmap = card.get_by_test_id("overlay-image"), card.get_by_test_id("heatmap-image")
        size = "img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])"  # data: URLs decode later
        assert xray_image.evaluate(size)[0] > 0 and xray_image.evaluate(size) == heatmap.evaluate(size)
        assert xray_image.bounding_box() == heatmap.bounding_box()  # stacked exactly: one picture

        slider = card.get_by_test_id("opacity")
        opacity = "img => getComputedStyle(img).opacity"
        assert slider.input_value() == "45" and float(heatmap.evaluate(opacity)) == pytest.approx(0.45)
        slider.fill("80")
        assert float(heatmap.evaluate(opacity)) == pytest.approx(0.8)
        slider.fill("0")
        assert float(heatmap.evaluate(opacity)) == 0.0
        slider.fill("45")  # the screenshot shows the overlay as it first appears

        assert xray.name in page.get_by_test_id("announcer").inner_text()  # read out to screen readers
        tab.screenshot(tmp_path / "page-1280x800.png")
        assert tab.errors == [], tab.errors
        assert tab.foreign_requests() == []
    finally:
        tab.close()


def test_refused_and_failed_files_read_as_words_one_card_per_file(app_url, browser):
    status, refusal = _predict_file(app_url, "notes.txt", NOTES)
    assert status == 400 and "notes.txt" in refusal["error"], refusal

    tab = Page(browser, app_url)
    page = tab.page
    try:
        tab.upload([{"name": "notes.txt", "mimeType": "text/plain", "buffer": NOTES},
                    {"name": "gradient.png", "mimeType": "image/png", "buffer": GRADIENT},
                    {"name": "scan.dcm", "mimeType": "application/dicom", "buffer": DICOM},
                    {"name": MARKUP_NAME, "mimeType": "image/png", "buffer": NOTES}])
        refused = tab.settled("notes.txt")
        assert refused.get_attribute("data-state") in ("refused", "error")
        assert refused.get_by_test_id("error").inner_text() == refusal["error"]
        assert tab.settled("gradient.png").get_attribute("data-state") == "done"
        # A browser cannot show a DICOM file itself: the card shows the X-ray as the service decoded it.
        scan = tab.settled("scan.dcm")
        assert scan.get_attribute("data-state") == "done"
        assert scan.get_by_test_id("overlay-image").evaluate("(image) => image.decode().then(() => image.naturalWidth)") > 0
        # A file name is text wherever it appears (title, the API's message), never markup.
        assert MARKUP_NAME in tab.settled(MARKUP_NAME).get_by_test_id("error").inner_text()
        assert page.locator("img[src='x']").count() == 0
        assert page.get_by_test_id("result-card").count() == 4

        # Dropped files take the same path as picked ones.
        page.get_by_test_id("drop-zone").evaluate(
            """(zone, bytes) => {
                const transfer = new DataTransfer();
                transfer.items.add(new File([new Uint8Array(bytes)], 'dropped.png', { type: 'image/png' }));
                zone.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
            }""", list(GRADIENT))
        assert tab.settled("dropped.png").get_attribute("data-state") == "done"

        # Serve's own overload answer is plain text: still words on the card, after one retry.
        calls = []

        def overloaded(route):
            calls.append(route.request.url)
            route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "text/plain"},
                          body="Request dropped due to backpressure")

        page.route("**/explain*", overloaded)
        tab.upload([{"name": "busy.png", "mimeType": "image/png", "buffer": GRADIENT}])
        busy = tab.settled("busy.png")
        assert busy.get_attribute("data-state") == "error"
        assert "503" in busy.get_by_test_id("error").inner_text()
        assert "backpressure" in busy.get_by_test_id("error").inner_text()
        assert len(calls) == 2  # retried once, after Retry-After
        assert page.get_by_test_id("result-card").count() == 6

        # "Clear answers" empties the page (and frees its pictures); new files work as before.
        page.unroute("**/explain*")
        page.get_by_test_id("clear-results").click()
        assert page.get_by_test_id("result-card").count() == 0
        assert page.locator("#empty").is_visible() and not page.get_by_test_id("clear-results").is_visible()
        assert "6 answers cleared" in page.get_by_test_id("announcer").inner_text()
        tab.upload([{"name": "again.png", "mimeType": "image/png", "buffer": GRADIENT}])
        assert tab.settled("again.png").get_attribute("data-state") == "done"
        assert page.get_by_test_id("result-card").count() == 1 and page.get_by_test_id("clear-results").is_visible()
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


def _chooser_from_key(page, key: str):
    """The file chooser that ``key`` opens on the focused picker. Chromium opens one only for the
    tab it counts as focused and, on a loaded machine, has let a key press pass without one: the
    tab is brought to the front and the press tried once more before this fails."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(2):
        page.bring_to_front()
        try:
            with page.expect_file_chooser(timeout=15_000) as chooser:
                page.keyboard.press(key)
            return chooser.value
        except PlaywrightTimeout:
            if attempt:
                raise AssertionError(f"{key} on the focused file picker opened no file chooser") from None


def test_the_keyboard_reaches_the_picker_and_the_opacity_slider(app_url, browser):
    tab = Page(browser, app_url)
    page = tab.page
    active = "() => document.activeElement && document.activeElement.dataset.testid"
    try:
        page.keyboard.press("Tab")
        assert page.evaluate(active) == "file-input"  # the first stop on the page
        ring = page.get_by_test_id("drop-zone").evaluate("label => getComputedStyle(label).outlineStyle")
        assert ring == "solid"  # the focus shows on the visible drop zone
        assert _chooser_from_key(page, "Space").is_multiple()
        _chooser_from_key(page, "Enter").set_files([{"name": "keyboard.png", "mimeType": "image/png", "buffer": GRADIENT}])
        assert tab.settled("keyboard.png").get_attribute("data-state") == "done"

        for _ in range(10):  # the slider is the next stop after the picker, within a few presses
            page.keyboard.press("Tab")
            if page.evaluate(active) == "opacity":
                break
        assert page.evaluate(active) == "opacity"
        page.keyboard.press("ArrowRight")
        slider = page.get_by_test_id("opacity")
        assert slider.input_value() == "46"
        heatmap = page.get_by_test_id("heatmap-image")
        assert float(heatmap.evaluate("img => getComputedStyle(img).opacity")) == pytest.approx(0.46)
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


def test_a_phone_sized_window_needs_no_sideways_scrolling(app_url, browser, tmp_path):
    tab = Page(browser, app_url, width=375, height=667)
    page = tab.page
    long_name = "scan-from-the-portable-unit-in-the-paediatric-ward-without-any-spaces-at-all.png"
    try:
        tab.upload([{"name": long_name, "mimeType": "image/png", "buffer": GRADIENT},
                    {"name": "notes.txt", "mimeType": "text/plain", "buffer": NOTES}])
        card = tab.settled(long_name)
        tab.settled("notes.txt")
        assert card.get_attribute("data-state") == "done"
        card.scroll_into_view_if_needed()
        box = card.bounding_box()
        assert card.is_visible() and box["x"] >= 0 and box["x"] + box["width"] <= 375
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), \
            page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        tab.screenshot(tmp_path / "page-375x667.png")
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


def test_under_a_route_prefix_a_flagged_image_reads_as_not_classified(app_url, browser, tmp_path):
    """The page behind a route prefix (/guarded/) with the guard's flag policy: an image that is not
    an X-ray gets a card that says it was not classified and why (the guard's score), one that
    passes is classified, and the model card states the policy in force."""
    from ray import serve

    from pneumonia.serving import build_app

    guarded = export_guarded(tmp_path)
    serve.run(build_app({"artifact": str(guarded.path), "ood_policy": "flag"}), name="guarded",
              route_prefix="/guarded")
    try:
        tab = Page(browser, f"{app_url}/guarded")
        try:
            tab.upload([{"name": "noise.png", "mimeType": "image/png", "buffer": OUTSIDE},
                        {"name": "dark.png", "mimeType": "image/png", "buffer": INSIDE}])
            flagged = tab.settled("noise.png")
            text = flagged.inner_text()
            assert flagged.get_attribute("data-state") == "refused", text
            assert "flagged" in text and "not classified" in text and "out-of-distribution score" in text
            assert tab.settled("dark.png").get_attribute("data-state") == "done"
            assert "flag (answered, not classified)" in tab.page.get_by_test_id("model-card").inner_text()
            assert tab.errors == [] and tab.foreign_requests() == [], (tab.errors, tab.foreign_requests())
        finally:
            tab.close()
    finally:
        serve.delete("guarded")

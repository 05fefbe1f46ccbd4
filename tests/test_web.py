"""The web page in a real browser: Debian's Chromium, driven by Selenium, on the app served from this process on
127.0.0.1 (so the test can count the generator's calls). Chromium runs headless with everything that would reach
the network switched off and a fresh profile."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

import vlora_hf

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no browser: the web tests need Debian's chromium and chromium-driver (`make test` installs them when "
           "it runs as root: apt-get install chromium chromium-driver)",
)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing (make test installs it)")
pytest.importorskip("gradio", reason="gradio is missing: pip install 'vlora_hf[web]' (make test installs it)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from vlora_hf.answering import answer_questions  # noqa: E402
from vlora_hf.web.app import build_app, launch  # noqa: E402
from vlora_hf.web.session import DemoSession  # noqa: E402

EXAMPLES = Path(vlora_hf.__file__).parent / "examples"
WAIT_S = 180  # generous: CI shares two cores; every wait ends as soon as its condition holds
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1500"]


@pytest.fixture(scope="module")
def served():
    """(session, url, generator call counter) for the demo model's page on a free loopback port."""
    session = DemoSession.load(device="cpu")
    calls = []
    hook = session.model.model.generator.register_forward_hook(lambda *args: calls.append(1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(session)
    launch(app, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield session, f"http://127.0.0.1:{port}/", calls
    app.close()
    hook.remove()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(), message=f"waited {WAIT_S} s for {what}")


def _answer(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")


def _upload(driver, path: Path) -> None:
    """Give the upload box a file (after clearing the one it shows), then wait for the page to take it."""
    clear = driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']")
    if clear:
        clear[0].click()
    field = _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload box")
    field[0].send_keys(str(path))


def _ask(driver, question: str, expected: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(question)
    driver.find_element(By.ID, "ask").click()
    _wait(driver, lambda: _answer(driver) == expected, f"the answer {expected!r} (the page shows {_answer(driver)!r})")


def _plot_size(driver) -> tuple[int, int]:
    """Rendered size of the delta-norm PNG, (0, 0) while there is none."""
    images = driver.find_elements(By.CSS_SELECTOR, "#delta-plot img")
    if not images or not images[0].get_attribute("src").endswith(".png"):
        return 0, 0
    return tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].clientHeight]", images[0]))


def test_page_answers_and_chat_reuses_the_images_weights(served, browser, tmp_path):
    session, url, calls = served
    browser.get(url)
    before = len(calls)
    _upload(browser, EXAMPLES / "shapes_0.png")
    _wait(browser, lambda: min(_plot_size(browser)) > 0, "the delta-norm plot")
    _ask(browser, "Describe the image.", "3 blue triangles")
    browser.find_element(By.CSS_SELECTOR, "#chat-mode input[type=checkbox]").click()
    _ask(browser, "How many shapes are there?", "3")
    chat = browser.find_element(By.ID, "chat").text
    assert chat.index("Describe the image.") < chat.index("3 blue triangles") < chat.index("How many shapes are there?")
    assert "LLM:" in browser.find_element(By.ID, "timings").text
    assert len(calls) - before == 1  # the image's perceptual weights were computed once, for both questions

    browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 40)
    shot = Path(os.environ.get("VLORA_WEB_SCREENSHOT") or tmp_path / "page.png")
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).format == "PNG"


def test_page_shows_the_processors_error_then_answers_again(served, browser, tmp_path):
    session, url, _ = served
    browser.get(url)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all")
    with pytest.raises(ValueError) as err:
        session.image_weights(corrupt)
    _upload(browser, corrupt)
    message = str(err.value).split(" (")[0]  # the detail in brackets names the file's path on the server
    assert "corrupt.png" in message
    _wait(browser, lambda: _answer(browser).startswith(f"Error: {message} ("), "the processor's error")
    assert min(_plot_size(browser)) == 0

    question = "Describe the image."
    second = answer_questions(session.model, session.processor, [Image.open(EXAMPLES / "shapes_1.png")], [question],
                              max_new_tokens=64)
    _upload(browser, EXAMPLES / "shapes_1.png")
    _wait(browser, lambda: _answer(browser) == "" and min(_plot_size(browser)) > 0, "the good upload")
    _ask(browser, question, second[0])
    alone = _plot_size(browser)
    browser.find_element(By.CSS_SELECTOR, "#upload2 input[type=file]").send_keys(str(EXAMPLES / "shapes_3.png"))
    _wait(browser, lambda: _plot_size(browser)[0] > alone[0], "the plot to draw the second image beside the first")

    third = answer_questions(session.model, session.processor, [Image.open(EXAMPLES / "shapes_2.png")], [question],
                             max_new_tokens=64)
    assert third != second
    browser.find_elements(By.CSS_SELECTOR, "#examples .thumbnail-item")[2].click()
    _wait(browser, lambda: _answer(browser) == "", "the example to replace the image")
    _ask(browser, question, third[0])

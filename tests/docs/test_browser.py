"""The built site read in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`
packages; .ci/run installs them) loads the home page, a guide and the LoraConfig API page over loopback
HTTP, and each renders with its navigation; the LoraConfig page shows every dataclass field with its
docstring. Screenshots go to $LORAFIT_DOCS_SCREENSHOTS when set (else the test's temporary folder)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from dataclasses import fields
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver packages (apt-get install chromium chromium-driver)")

PAGES = {  # screenshot name -> (page, its title in the navigation)
    "home": ("index.html", "Home"),
    "guide-training": ("guides/training.html", "Training"),
    "api-loraconfig": ("reference/api/configs.html", "Adapter configs"),
}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(site):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("LORAFIT_DOCS_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(browser, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")


@pytest.mark.parametrize("shot", list(PAGES))
def test_the_page_renders_with_its_navigation(browser, server, screenshots, shot):
    from selenium.webdriver.common.by import By

    page, title = PAGES[shot]
    open_page(browser, f"{server}/{page}")
    assert browser.execute_script("return document.fonts.status") == "loaded"
    sidebar = browser.find_element(By.CSS_SELECTOR, ".md-sidebar--primary")
    content = browser.find_element(By.CSS_SELECTOR, "article.md-content__inner")
    assert sidebar.is_displayed() and content.is_displayed()
    assert sidebar.rect["x"] + sidebar.rect["width"] <= content.rect["x"] + 1  # the navigation left of the text
    visible = {a.text for a in sidebar.find_elements(By.CSS_SELECTOR, "a.md-nav__link, label.md-nav__link")
               if a.is_displayed()}
    assert {"Home", "Getting started", "Training", "Command line", "Summary and plots"} <= visible, visible
    active = [a.text for a in sidebar.find_elements(By.CSS_SELECTOR, "a.md-nav__link--active") if a.is_displayed()]
    assert active == [title]
    heading = content.find_element(By.TAG_NAME, "h1")
    assert heading.is_displayed() and heading.size["height"] > 20
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    browser.save_screenshot(str(screenshots / f"{shot}.png"))
    assert (screenshots / f"{shot}.png").stat().st_size > 10_000


def test_the_loraconfig_page_lists_every_field_with_its_docstring(browser, server):
    from selenium.webdriver.common.by import By

    from lorafit.config import LoraConfig
    from lorafit.fieldinfo import field_docs

    open_page(browser, f"{server}/reference/api/configs.html")
    docs = field_docs(LoraConfig)
    for f in fields(LoraConfig):
        heading = browser.find_element(By.ID, f"lorafit.config.LoraConfig.{f.name}")
        assert heading.text.split()[-1] == f.name
        body = heading.find_element(By.XPATH, "following-sibling::div[contains(@class, 'doc-contents')]")
        browser.execute_script("arguments[0].scrollIntoView()", body)
        assert body.is_displayed()
        assert squash(docs[f.name]) in squash(body.text), f.name


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[*`]", "", text)).strip()

"""Helpers for the page tests in headless Chromium (Debian's chromium + chromium-driver): a
driver, waits, and reading the result grid."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "web"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1400,1000")

needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason="needs Debian's chromium and chromium-driver (scripts/install-test-services.sh)")


def new_driver(downloads: Path):
    """A fresh headless browser session (its own profile: no history, cache or storage)."""
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium fetch a driver or browser
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    SHOTS.mkdir(parents=True, exist_ok=True)
    return driver


def wait(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def cards(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#results .card')].map(c => ({
          id: Number(c.dataset.id), score: c.querySelector('.score').textContent,
          prob: (c.querySelector('.prob') || {}).textContent || null,
          group: (c.querySelector('.group') || {}).textContent || null,
          name: c.querySelector('.name').textContent,
          tags: c.querySelector('.tags').textContent,
          loaded: c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0}));""")


def results_after(driver, action, what) -> list[dict]:
    """Do ``action`` and wait for a new result grid with every thumbnail loaded."""
    driver.execute_script("const s = document.getElementById('status'); "
                          "if (s) s.textContent = '';")
    action()
    wait(lambda: "result" in driver.find_element("id", "status").text
         or not driver.find_element("id", "error").get_attribute("hidden"), what=what)
    error = driver.find_element("id", "error")
    assert error.get_attribute("hidden"), error.text
    wait(lambda: all(c["loaded"] for c in cards(driver)), what=f"thumbnails of {what}")
    return cards(driver)


def open_page(driver, url: str) -> None:
    """Load ``url`` and wait until the page has read the server's features."""
    driver.get(url)
    wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"),
         what="page ready")


def set_value(driver, element_id: str, value: str) -> None:
    driver.execute_script("document.getElementById(arguments[0]).value = arguments[1];",
                          element_id, value)


def api(url: str, path: str, **kwargs) -> list[dict]:
    return api_page(url, path, **kwargs)["results"]


def api_page(url: str, path: str, **kwargs) -> dict:
    response = httpx.post(f"{url}{path}", timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def ids(found: list[dict]) -> list[int]:
    return [int(r["id"]) for r in found]

"""The page's shareable state in headless Chromium: the search lives in the URL fragment (never
the query string), reloads in a fresh browser to the same results, the back button returns to
the previous search; the detail panel (keyboard too); paging with "more"; data shown as text."""

from __future__ import annotations

import shutil

import httpx
import pytest

from .conftest import PYDICOM_TEST_FILES, write_images
from .page import (SHOTS, api, cards, ids, needs_chromium, new_driver, open_page, results_after,
                   set_value, wait)
from .serving import index_store, make_app, running

pytestmark = needs_chromium
HOSTILE = "<img src=x onerror=document.title='pwned'>.png"


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("page-state")
    write_images(root / "images", 9, seed=3)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_TEST_FILES / name, root / "images" / name)
    odd = write_images(root / "odd", 1, seed=11)[0]
    odd.rename(root / "images" / HOSTILE)
    index_store(root / "store", root / "images", tiny_model)
    with running(make_app(root / "store")) as url:
        yield root, url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = new_driver(tmp_path_factory.mktemp("downloads"))
    yield driver
    driver.quit()


def submit_query(driver, text: str, k: int, what: str) -> list[dict]:
    set_value(driver, "query", text)
    set_value(driver, "f-k", str(k))
    return results_after(driver, lambda: driver.find_element("id", "query").submit(), what)


def test_search_in_the_fragment_reloads_in_a_fresh_browser_and_goes_back(site, browser,
                                                                         tmp_path):
    _, url = site
    driver = browser
    open_page(driver, url + "/")
    first = submit_query(driver, "pleural effusion", 5, "first search")
    assert ids(first) == ids(api(url, "/search", json={"query": "pleural effusion", "k": 5}))
    location = driver.execute_script("return {search: location.search, hash: location.hash}")
    assert location["search"] == ""  # the text never reaches the server's access log
    assert "q=pleural+effusion" in location["hash"] and "k=5" in location["hash"]
    shared = driver.current_url
    # Only the page's own files, and nothing its policy had to block.
    loaded = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(name.startswith(url + "/") for name in loaded), loaded
    assert not [e for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]

    # The link opened in a fresh browser (no history, no storage) shows the same results.
    fresh = new_driver(tmp_path / "downloads")
    try:
        found = results_after(fresh, lambda: open_page(fresh, shared), "shared link")
        assert ids(found) == ids(first)
        assert fresh.find_element("id", "query").get_attribute("value") == "pleural effusion"
        assert fresh.find_element("id", "f-k").get_attribute("value") == "5"
    finally:
        fresh.quit()

    # Back returns to the previous search (results and form), forward to the next one.
    second = submit_query(driver, "chest tube", 3, "second search")
    assert ids(second) == ids(api(url, "/search", json={"query": "chest tube", "k": 3}))
    assert ids(results_after(driver, driver.back, "back")) == ids(first)
    assert driver.find_element("id", "query").get_attribute("value") == "pleural effusion"
    assert driver.find_element("id", "f-k").get_attribute("value") == "5"
    assert ids(results_after(driver, driver.forward, "forward")) == ids(second)


def test_detail_panel_by_keyboard_similar_and_escaping(site, browser):
    root, url = site
    driver = browser
    from selenium.webdriver.common.keys import Keys

    open_page(driver, url + "/")
    found = submit_query(driver, "effusion", 24, "all images")
    assert len(found) == 12
    # A file name that is HTML stays text: on the card and in the panel.
    odd = next(c for c in found if c["name"] == HOSTILE)
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert driver.title == "medsearch"

    card = driver.find_element("css selector", f'#results .card[data-id="{odd["id"]}"]')
    driver.execute_script("arguments[0].focus()", card)
    card.send_keys(Keys.ENTER)
    wait(lambda: driver.find_element("id", "detail").is_displayed(), what="detail panel")
    assert driver.switch_to.active_element.get_attribute("id") == "detail-close"
    row = httpx.get(f"{url}/images/{odd['id']}").json()
    fields = wait(lambda: _fields(driver), what="detail fields")
    assert fields["path"] == row["path"] == str((root / "images" / HOSTILE).absolute())
    assert fields["id"] == str(odd["id"])
    wait(lambda: driver.execute_script(
        "const i = document.getElementById('detail-img'); return i.complete && i.naturalWidth"),
        what="larger preview")
    driver.save_screenshot(str(SHOTS / "7-detail.png"))
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(lambda: not driver.find_element("id", "detail").is_displayed(), what="panel closed")
    assert driver.switch_to.active_element.get_attribute("data-id") == str(odd["id"])

    # "Similar to this" runs a similar search and is a new history entry.
    card.send_keys(Keys.ENTER)
    wait(lambda: driver.find_element("id", "detail").is_displayed(), what="detail panel again")
    similar = results_after(driver, driver.find_element("id", "detail-similar").click, "similar")
    assert ids(similar) == ids(api(url, "/similar", json={"id": odd["id"], "k": 24}))
    assert f"mode=similar&id={odd['id']}" in driver.execute_script("return location.hash")
    assert not driver.find_element("id", "detail").is_displayed()
    assert ids(results_after(driver, driver.back, "back to text")) == ids(found)


def _fields(driver) -> dict:
    return driver.execute_script("""
        const out = {};
        document.querySelectorAll('#detail-meta dt').forEach(
          dt => { out[dt.textContent] = dt.nextElementSibling.textContent; });
        return Object.keys(out).length ? out : null;""")


def test_more_pages_on_until_the_results_end(site, browser):
    _, url = site
    driver = browser
    open_page(driver, url + "/")
    everything = ids(api(url, "/search", json={"query": "effusion", "k": 24}))
    found = submit_query(driver, "effusion", 5, "first page")
    assert ids(found) == everything[:5]
    more = driver.find_element("id", "more-button")
    assert more.is_displayed()
    assert ids(results_after(driver, more.click, "second page")) == everything[:10]
    assert ids(results_after(driver, more.click, "last page")) == everything
    wait(lambda: not more.is_displayed(), what="more hidden at the end")
    assert [c["id"] for c in cards(driver)] == everything

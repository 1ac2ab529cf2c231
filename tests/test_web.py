"""The web page end to end in headless Chromium (Debian's chromium + chromium-driver).

Screenshots land in test-output/web/ for a person to look at.
"""

from __future__ import annotations

import base64
import csv
import io
import shutil
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from .conftest import PYDICOM_TEST_FILES, write_images
from .page import SHOTS, api, needs_chromium, new_driver, results_after, set_value, wait
from .serving import index_store, make_app, running

TOKEN = "web-token-0123456789abcdef"

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("web")
    write_images(root / "images", 9, seed=2)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_TEST_FILES / name, root / "images" / name)
    index_store(root / "store", root / "images", tiny_model)
    with running(make_app(root / "store")) as url:
        yield root, url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = new_driver(tmp_path_factory.mktemp("downloads"))
    yield driver
    driver.quit()


def test_search_filter_similar_drop_and_export(site, browser):
    root, url = site
    driver = browser
    driver.get(url + "/")
    assert driver.title == "medsearch"
    wait(lambda: "11 images" in driver.find_element("id", "store-info").text, what="store stats")

    # Text search: the grid shows the API's results in order, with scores and thumbnails.
    box = driver.find_element("id", "query")
    box.send_keys("pleural effusion")
    found = results_after(driver, lambda: driver.find_element("id", "search-button").click(),
                          "text search")
    expected = api(url, "/search", json={"query": "pleural effusion", "k": 24})
    assert [c["id"] for c in found] == [r["id"] for r in expected]
    assert [c["score"] for c in found] == [f"{r['score']:.3f}" for r in expected]
    driver.save_screenshot(str(SHOTS / "1-search.png"))

    # Filters: modality, then a date range, then a label added to the store while serving.
    set_value(driver, "f-modality", "CT, MR")
    found = results_after(driver, lambda: box.submit(), "modality filter")
    assert sorted(c["tags"].split(" · ")[0] for c in found) == ["CT", "MR"]
    set_value(driver, "f-date-from", "2004-01-01")
    set_value(driver, "f-date-to", "2004-02-01")
    found = results_after(driver, lambda: box.submit(), "date filter")
    assert [c["tags"] for c in found] == ["CT · 20040119"]
    for element in ("f-modality", "f-date-from", "f-date-to"):
        set_value(driver, element, "")
    labelled = _add_label(root / "store", "effusion", expected[:2])
    set_value(driver, "f-label", "effusion")
    found = results_after(driver, lambda: box.submit(), "label filter")
    assert sorted(c["id"] for c in found) == sorted(labelled)
    driver.save_screenshot(str(SHOTS / "2-label-filter.png"))
    set_value(driver, "f-label", "")

    # A click on a result opens its detail panel; "similar to this" runs a similar-case search.
    results_after(driver, lambda: box.submit(), "text search again")
    first = driver.find_elements("css selector", "#results .card")[0]
    clicked = int(first.get_attribute("data-id"))
    first.click()
    wait(lambda: driver.find_element("id", "detail").is_displayed(), what="detail panel")
    found = results_after(driver, driver.find_element("id", "detail-similar").click,
                          "similar search")
    assert driver.find_element("id", "summary").text == f"similar to image #{clicked}"
    assert [c["id"] for c in found] == [r["id"] for r in api(url, "/similar", json={"id": clicked, "k": 24})]
    assert clicked not in [c["id"] for c in found]
    driver.save_screenshot(str(SHOTS / "3-similar.png"))

    # Drop a DICOM file on the drop zone (a real drop event with the file's bytes).
    box.clear()
    ct = root / "images" / "CT_small.dcm"
    found = results_after(driver, lambda: driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'dropped.dcm'));
        document.getElementById('drop-zone').dispatchEvent(
          new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));""",
        base64.b64encode(ct.read_bytes()).decode()), "image drop")
    top = httpx.get(f"{url}/images/{found[0]['id']}").json()
    assert top["path"] == str(ct.absolute()) and float(found[0]["score"]) > 0.999
    driver.save_screenshot(str(SHOTS / "4-drop.png"))

    # Export the current (image) results as CSV: the file equals the API's export.
    for old in driver.downloads.iterdir():
        old.unlink()
    driver.find_element("id", "export-button").click()
    exported = wait(lambda: [p for p in driver.downloads.glob("*.csv")], what="CSV download")[0]
    wait(lambda: not list(driver.downloads.glob("*.crdownload")), what="download to finish")
    rows = list(csv.DictReader(io.StringIO(exported.read_text())))
    assert [int(r["id"]) for r in rows] == [c["id"] for c in found]
    assert rows[0]["path"] == str(ct.absolute())

    # Choosing a file through the picker works too; clearing it returns to text search.
    png = sorted((root / "images").glob("*.png"))[0]
    found = results_after(driver, lambda: driver.find_element("id", "file-input").send_keys(str(png)),
                          "file picker")
    assert httpx.get(f"{url}/images/{found[0]['id']}").json()["path"] == str(png.absolute())
    driver.find_element("id", "clear-image").click()

    # Errors reach the page as a message, not a broken grid.
    box.send_keys('"effusion" - "effusion"')
    box.submit()
    wait(lambda: driver.find_element("id", "error").is_displayed(), what="error message")
    assert "cancel" in driver.find_element("id", "error").text
    driver.save_screenshot(str(SHOTS / "5-error.png"))


def _add_label(store: Path, label: str, results: list[dict]) -> list[int]:
    """Label two images straight in SQLite, as a tagging run in another process would."""
    from retrieval.store.schema import LabelRow
    from retrieval.store import Store

    st = Store.open(store)
    ids = [r["id"] for r in results]
    with st.sessions() as session, session.begin():
        for image_id in ids:
            session.add(LabelRow(image_id=image_id, label=label, source="user"))
    with st.sessions() as session:
        assert len(session.scalars(select(LabelRow).where(LabelRow.label == label)).all()) == 2
    st.engine.dispose()
    return ids


def test_page_with_a_token_uses_the_browsers_login(site, browser):
    root, _ = site
    with running(make_app(root / "store", token=TOKEN)) as url:
        port = url.rsplit(":", 1)[1]
        # Credentials in the URL stand in for the login prompt a headless browser cannot show;
        # then the plain address works from the browser's credential cache, as after a prompt.
        browser.get(f"http://reader:{TOKEN}@127.0.0.1:{port}/")
        wait(lambda: "images" in browser.find_element("id", "store-info").text, what="stats with token")
        browser.get(f"http://127.0.0.1:{port}/")
        wait(lambda: "images" in browser.find_element("id", "store-info").text, what="stats, cached login")
        browser.find_element("id", "query").send_keys("effusion")
        found = results_after(browser, lambda: browser.find_element("id", "query").submit(),
                              "search with token")
        assert len(found) == 11
        browser.save_screenshot(str(SHOTS / "6-token.png"))
        assert httpx.get(f"{url}/stats").status_code == 401  # and without it, nothing

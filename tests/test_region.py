"""Region-of-interest queries: a box holding exactly an indexed image's pixels (pasted into a
bigger picture) embeds as those pixels saved as a file do, so that image comes first, from the
command line (file and --id) and the API (upload and id); boxes on the preview map back through
the padding; bad boxes are refused naming the region."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import InputError
from retrieval.region import Region

from .serving import cli, index_store

BOX = (70, 50, 60, 40)  # where the target sits in the composite: x, y, w, h


@pytest.fixture(scope="module")
def indexed(tiny_model, tmp_path_factory):
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("region")
    folder = root / "images"
    folder.mkdir()
    target = rng.integers(0, 256, (BOX[3], BOX[2], 3), dtype=np.uint8)
    Image.fromarray(target).save(folder / "target.png")
    for i in range(6):
        size = (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"other-{i}.png")
    composite = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    x, y, w, h = BOX
    composite[y:y + h, x:x + w] = target
    Image.fromarray(composite).save(folder / "composite.png")
    store = root / "store"
    index_store(store, folder, tiny_model)
    return store, folder


def _ids(store):
    from medsearch.app import Medsearch

    with Medsearch.open(store) as found:
        rows = found.store.rows(found.store.vector_ids().tolist())
        return {row["path"].rsplit("/", 1)[-1]: i for i, row in rows.items()}


def test_a_box_holding_an_indexed_image_finds_it_first(indexed):
    from medsearch.app import Medsearch

    store, folder = indexed
    ids = _ids(store)
    box = ",".join(map(str, BOX))
    by_file = cli("similar", str(folder / "composite.png"), "--store", str(store), "-k", "3",
                  "--region", box)
    assert by_file["results"][0]["id"] == ids["target.png"]
    assert by_file["results"][0]["score"] >= 0.9999
    by_id = cli("similar", "--id", str(ids["composite.png"]), "--store", str(store), "-k", "3",
                "--region", box)
    assert by_id["results"][0]["id"] == ids["target.png"]
    whole = cli("similar", str(folder / "composite.png"), "--store", str(store), "-k", "3")
    assert whole["results"][0]["id"] == ids["composite.png"]  # without the box: itself
    with Medsearch.open(store) as found:
        region = found.embed_file(folder / "composite.png", region=Region(*BOX))
        saved = found.embed_file(folder / "target.png")
    assert float(region @ saved) >= 0.9999


def test_the_api_takes_a_region_with_an_upload_or_an_id(indexed):
    from fastapi.testclient import TestClient

    from .serving import make_app

    store, folder = indexed
    ids = _ids(store)
    with TestClient(make_app(store), base_url="http://127.0.0.1") as client:
        upload = client.post("/similar", files={"file": ("c.png", (folder / "composite.png").read_bytes())},
                             data={"k": "2", "region": ",".join(map(str, BOX))})
        assert upload.status_code == 200, upload.text
        assert upload.json()["results"][0]["id"] == ids["target.png"]
        size = client.get("/stats").json()["image_size"]
        # the same box on the preview: the 200×150 composite is centred 25 px down on a
        # 200-side square, scaled to size
        scale = size / 200
        preview = [round(BOX[0] * scale), round((BOX[1] + 25) * scale),
                   round(BOX[2] * scale), round(BOX[3] * scale)]
        by_id = client.post("/similar", json={"id": ids["composite.png"], "k": 2, "region": preview,
                                              "region_space": "preview"})
        assert by_id.status_code == 200, by_id.text
        assert by_id.json()["results"][0]["id"] == ids["target.png"]
        outside = client.post("/similar", json={"id": ids["composite.png"], "region": [500, 500, 5, 5]})
        assert outside.status_code == 400 and "region" in outside.json()["error"]
        assert client.post("/similar", json={"id": 1, "region": [1, 2, 3]}).status_code == 422
        assert client.post("/similar", json={"id": 1, "region": [1, 2, 0, 3]}).status_code == 422
        text_only = client.post("/search", json={"query": "x", "region": [1, 2, 3, 4]})
        assert text_only.status_code == 400 and "one query image" in text_only.json()["error"]


def test_preview_boxes_map_back_through_the_padding():
    # a 200×100 image on a 448 preview: scale 200/448, 50 px of padding above and below
    assert Region(0, 112, 448, 224, "preview").box(200, 100, 448) == (0, 0, 200, 100)
    assert Region(0, 0, 448, 448, "preview").box(200, 100, 448) == (0, 0, 200, 100)
    assert Region(224, 224, 10, 10, "preview").box(200, 100, 448) == (100, 50, 105, 55)
    with pytest.raises(ValueError, match="holds no pixel"):
        Region(0, 0, 448, 100, "preview").box(200, 100, 448)  # all padding
    assert Region(190, 90, 50, 50).box(200, 100, 448) == (190, 90, 200, 100)  # clipped


@pytest.mark.parametrize("value", ["1,2,3", "a,b,c,d", "1.5,2,3,4", "-1,0,5,5", "0,0,0,5", [1, 2, 3, 4, 5]])
def test_bad_regions_name_the_option(value):
    with pytest.raises(InputError, match="region"):
        Region.parse(value)

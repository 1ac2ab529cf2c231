"""The one decode entry (indexer.view): bytes decode as files do, and a store's previews show
exactly what was embedded, with the decode settings the store recorded."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from indexer.view import DecodeSettings, read_image, read_images, settings_for_run
from retrieval.errors import InputError

from .conftest import PYDICOM_TEST_FILES as TF
from .conftest import write_images
from .serving import cli, make_app, run_cli, running

CT_FILES = ("CT_small.dcm",)


_cli = run_cli


# -- bytes == file -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("entry")
    png, jpeg = write_images(folder, 2, seed=3)  # img000.png (RGB), img001.jpg (grey)
    ct = folder / "ct.dcm"
    shutil.copy(TF / "CT_small.dcm", ct)
    return {"png": png, "jpeg": jpeg, "dicom": ct, "multiframe": TF / "examples_ybr_color.dcm"}


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom", "multiframe"])
def test_bytes_decode_exactly_as_the_file(files, kind):
    path = files[kind]
    from_file = read_image(path, image_size=48)
    from_bytes = read_image(path.read_bytes(), image_size=48)
    assert from_bytes.frame == from_file.frame and from_bytes.frame_count == from_file.frame_count
    np.testing.assert_array_equal(from_bytes.tensor, from_file.tensor)
    assert from_file.tensor.shape == (3, 48, 48) and from_file.tensor.dtype == np.float32


def test_isolated_bytes_decode_exactly_as_the_file(files):
    path = files["dicom"]
    isolated = read_image(path.read_bytes(), image_size=48, isolated=True)
    np.testing.assert_array_equal(isolated.tensor, read_image(path, image_size=48).tensor)


def test_frames_follow_the_settings(files):
    path = files["multiframe"]
    middle = read_image(path, image_size=32)
    assert (middle.frame, middle.frame_count) == (15, 30)
    assert read_image(path, image_size=32, settings=DecodeSettings(frames="first")).frame == 0
    assert read_image(path, image_size=32, frame=3).frame == 3
    assert [i.frame for i in read_images(path, image_size=32,
                                         settings=DecodeSettings(frames="3"))] == [0, 14, 29]
    with pytest.raises(InputError, match="frame 30 does not exist"):
        read_image(path, image_size=32, frame=30)


def test_errors_name_the_file_or_upload(tmp_path):
    with pytest.raises(InputError, match=r"^upload: "):
        read_image(b"this is not an image", image_size=32)
    with pytest.raises(InputError, match="nowhere.png: no such file"):
        read_image(tmp_path / "nowhere.png", image_size=32)
    with pytest.raises(InputError, match=r"^upload: empty file"):
        read_image(b"", image_size=32)


def test_default_window_differs_from_lung_window(files):
    default = read_image(files["dicom"], image_size=64).display_rgb()
    lung = read_image(files["dicom"], image_size=64, settings=DecodeSettings(window="lung"))
    assert lung.display_rgb().shape == default.shape == (64, 64, 3)
    assert not np.array_equal(lung.display_rgb(), default)


def test_settings_round_trip_and_conflicts():
    lung = DecodeSettings(window="lung", frames="all", series_vectors=True)
    assert DecodeSettings.from_manifest(lung.to_json()) == lung
    assert DecodeSettings.from_manifest(None) == DecodeSettings()
    assert settings_for_run(lung.to_json()) == lung                     # no choices: the store's
    assert settings_for_run(lung.to_json(), window="lung") == lung       # the same choice: fine
    with pytest.raises(InputError, match="indexed with window 'lung'"):
        settings_for_run(lung.to_json(), window="bone")
    assert settings_for_run(None, frames="first", default_frames="all").frames == "first"


# -- a CT store indexed with --window lung: previews equal what was embedded --------------------
@pytest.fixture(scope="module")
def lung_store(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("lung")
    folder = root / "ct"
    folder.mkdir()
    for name in CT_FILES:
        shutil.copy(TF / name, folder / name)
    doc = cli("index", str(folder), "--store", str(root / "store"), "--model", str(tiny_model),
              "--workers", "0", "--no-progress", "--window", "lung")
    assert doc["indexed"] == len(CT_FILES) and not doc["failures"]
    return root


def test_lung_store_serves_previews_equal_to_the_embedded_tensors(lung_store, tiny_model):
    from indexer.decode import DecodeOptions, decode_source
    from indexer.sources import SourceFile
    from retrieval.model import VisionEncoder
    from retrieval.model.preprocess import model_input_to_uint8
    from retrieval.store import Store

    store_root = lung_store / "store"
    manifest = json.loads((store_root / "manifest.json").read_text())
    assert manifest["decode"] == {"window": "lung", "frames": "middle", "series_vectors": False}
    store = Store.open(store_root, readonly=True)
    ids = [int(i) for i in store.all_vectors()[0]]
    rows = store.rows(ids)
    encoder = VisionEncoder.load(str(tiny_model), "cpu")
    with running(make_app(store_root)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for image_id in ids:
            row = rows[image_id]
            response = client.get(f"/images/{image_id}/preview")
            assert response.status_code == 200, response.text
            shown = np.asarray(Image.open(io.BytesIO(response.content)))
            # the worker path, as `index --window lung` ran it
            path = Path(row["path"])
            worker = decode_source(SourceFile(str(path), path.stat().st_size, 0, "dicom"),
                                   DecodeOptions(image_size=encoder.image_size, window="lung"))
            (frame,) = [f for f in worker.frames if f.index == row["frame"]]
            embedded = torch.from_numpy(frame.tensor)
            np.testing.assert_array_equal(shown, model_input_to_uint8(embedded))
            # ... and not what the default window would show (the preview used to lie)
            default = read_image(path, image_size=encoder.image_size, frame=row["frame"])
            assert not np.array_equal(shown, default.display_rgb())
            # the stored vector is the embedding of exactly that tensor
            vector = encoder.embed_batch(embedded[None])[0]
            stored = store.vectors([image_id])[0]
            cosine = float(np.dot(vector, stored) / (np.linalg.norm(vector) * np.linalg.norm(stored)))
            assert cosine >= 0.99999, cosine
    store.close()


def test_index_refuses_other_settings_and_reuses_the_recorded_ones(lung_store, tiny_model, capsys):
    store_root = lung_store / "store"
    base = ("index", str(lung_store / "ct"), "--store", str(store_root), "--model", str(tiny_model),
            "--workers", "0", "--no-progress", "--json")
    code, out, err = _cli(capsys, *base, "--window", "bone")
    assert code != 0 and "indexed with window 'lung'" in out + err
    code, out, err = _cli(capsys, *base)                 # no choice given: the store's
    assert code == 0, err
    assert json.loads(out)["unchanged"] == len(CT_FILES)
    assert json.loads((store_root / "manifest.json").read_text())["decode"]["window"] == "lung"
    code, out, _ = _cli(capsys, "info", "--store", str(store_root), "--json")
    doc = json.loads(out)
    assert doc["decode"]["window"] == "lung" and doc["decode_recorded"] is True


def test_a_store_without_recorded_settings_opens_with_the_defaults(lung_store, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    shutil.copytree(lung_store / "store", legacy)
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["decode"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = _cli(capsys, "info", "--store", str(legacy), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["decode_recorded"] is False and doc["decode"] == DecodeSettings().to_json()
    assert "decode settings not recorded; defaults assumed" in err

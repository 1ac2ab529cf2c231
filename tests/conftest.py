"""Shared fixtures: one tiny random SigLIP per test session, and small image folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PYDICOM_TEST_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"


@pytest.fixture(scope="session", autouse=True)
def _throwaway_user_folders(tmp_path_factory) -> None:
    """Patient-key files (retrieval.privacy) and the precision probe's cache go to temporary
    folders, never the user's: a run depends on no earlier run (the CLI processes the tests
    start inherit both, so they and the tests agree on what `auto` picked)."""
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    os.environ["MEDSEARCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("medsearch-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from retrieval.model.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "tiny-siglip")


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Distinct structured images (8-bit RGB, 8-bit grey, 16-bit grey), varied sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(64, 200)), int(rng.integers(64, 200))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.sin(xx / (3 + i)) + np.cos(yy / (5 + 2 * i)) + rng.normal(0, 0.3, (h, w))
        unit = (base - base.min()) / (base.max() - base.min())
        kind = i % 3
        if kind == 0:
            rgb = np.stack([unit, unit[::-1], unit[:, ::-1]], axis=2)
            img = Image.fromarray((rgb * 255).astype(np.uint8))
            path = folder / f"img{i:03d}.png"
        elif kind == 1:
            img = Image.fromarray((unit * 255).astype(np.uint8))
            path = folder / f"img{i:03d}.jpg"
        else:
            img = Image.fromarray((unit * 65535).astype(np.uint16))
            path = folder / f"img{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 9)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(PYDICOM_TEST_FILES / name, folder / name)
    return folder


def add_bad_files(folder: Path) -> list[Path]:
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    fake = folder / "notes.jpg"
    fake.write_text("this is a text file, not a JPEG")
    good = next(folder.glob("*.png")).read_bytes()
    truncated = folder / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    return [empty, fake, truncated]


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL on loopback for the whole session (tests/postgres.py)."""
    from tests import postgres

    server, reason = postgres.start_server()
    if server is None:
        postgres.unavailable(reason)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str | None:
    """Where a test's store keeps its rows: None (SQLite in the folder) or the URL of a fresh
    PostgreSQL database; tests that build stores take it to run on both."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").create_database()

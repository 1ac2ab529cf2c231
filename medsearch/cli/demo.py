"""`medsearch demo`: the whole product on a fresh offline machine, in one command.

Makes the tiny test model, builds a small sample (real DICOM files shipped inside pydicom plus
generated images), indexes it, and runs a text query and a similar-case query.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer


from .main import app
from .options import JsonOpt
from .output import RESEARCH_NOTICE, emit, note, results_table

#: Real files from pydicom's own test set: CT, MR, NM, US colour, palette, JPEG 2000, RLE.
SAMPLE_DICOM = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                "examples_palette.dcm", "examples_ybr_color.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                "liver_1frame.dcm"]
DEMO_QUERY = "left pneumothorax"


def _synthetic_images(folder: Path, n: int = 8) -> None:
    """Radiograph-like 16-bit greys and skin-like RGB photos, distinct from each other."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[0:384, 0:320] / 64.0
        if i % 2 == 0:
            body = np.exp(-((xx - 2.5) ** 2 / (1.5 + i / 8) + (yy - 3) ** 2 / 4))
            ribs = 0.15 * (np.sin(yy * (6 + i)) > 0.6)
            grey = np.clip(body + ribs + rng.normal(0, 0.03, body.shape), 0, 1)
            Image.fromarray((grey * 65535).astype(np.uint16)).save(folder / f"radiograph_{i}.png")
        else:
            skin = np.stack([0.85 - 0.1 * np.sin(xx), 0.65 + 0.05 * np.cos(yy), 0.55 + 0 * xx], 2)
            lesion = np.exp(-((xx - 2 - i / 10) ** 2 + (yy - 3) ** 2) * (1 + i / 3))[..., None]
            rgb = np.clip(skin * (1 - 0.7 * lesion) + rng.normal(0, 0.02, skin.shape), 0, 1)
            Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / f"skin_{i}.jpg")


@app.command("demo")
def demo_cmd(
    directory: Annotated[Optional[Path], typer.Option(
        "--dir", help="Where to put the model, sample and store (default: a temporary folder).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Offline end-to-end demo with a tiny random model (rankings are not meaningful)."""
    import pydicom
    from indexer.pipeline import Indexer
    from retrieval.model import VisionEncoder
    from retrieval.model.testmodel import make_test_model

    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="medsearch-demo-"))
    sample = root / "sample"
    sample.mkdir(parents=True, exist_ok=True)
    test_files = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in SAMPLE_DICOM:
        if (test_files / name).is_file():
            shutil.copy(test_files / name, sample / name)
    _synthetic_images(sample)

    note("NOTE: this demo uses a tiny RANDOMLY initialised SigLIP, so the rankings below are "
         "not meaningful. With the real model: accept the MedSigLIP terms on Hugging Face, log "
         "in, and run `medsearch index FOLDER --store DIR` (default model google/medsiglip-448).")
    model_dir = root / "tiny-siglip"
    if not (model_dir / "config.json").is_file():
        make_test_model(model_dir)
    encoder = VisionEncoder.load(str(model_dir), device="cpu")
    store_dir = root / "store"
    from retrieval.search import Searcher
    from retrieval.store import Store, manifest_for

    store = Store.open_or_create(store_dir, manifest_for(encoder, "Flat"))
    with store.exclusive():
        with Indexer(store, encoder, workers=1, progress=False) as indexer:
            report = indexer.run([sample])
    searcher = Searcher(store)
    text_results = searcher.text(DEMO_QUERY, k=5)
    query_id = text_results[0].id if text_results else 1
    similar_results = searcher.similar_id(query_id, k=5)
    store.close()

    doc = {
        "model": str(model_dir), "random_model": True, "store": str(store_dir),
        "index": report.to_json(),
        "text_query": {"text": DEMO_QUERY, "results": [r.to_json() for r in text_results]},
        "similar_query": {"id": query_id, "results": [r.to_json() for r in similar_results]},
        "next": f"medsearch search 'pleural effusion' --store {store_dir}",
    }

    def human(d: dict) -> str:
        ix = d["index"]
        return "\n".join([
            f"Indexed {ix['indexed']} files ({ix['images']} images) into {d['store']}; "
            f"{ix['failed']} failed, {len(ix['skipped'])} skipped.",
            "", f"Text query {DEMO_QUERY!r}:", results_table(d["text_query"]),
            "", f"Similar to id {d['similar_query']['id']}:", results_table(d["similar_query"]),
            "", "The model is random: these rankings show the machinery, not medicine.",
            f"Try: {d['next']}", RESEARCH_NOTICE])

    emit(doc, json_out, human)

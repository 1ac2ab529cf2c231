"""Embedding benchmark: the full-size MedSigLIP-448 architecture (random weights) end to end.

Writes a full-size random checkpoint once (save_pretrained into --cache-dir, so the real
loading path runs), generates a corpus of PNG and DICOM files of realistic sizes, then reports
as one JSON object (--json): model-only throughput on ready tensors, end-to-end indexing
throughput (files → committed store), their ratio, FLOPs and MFU against a stated peak,
decoding speed per worker, what the host side alone sustains (the same indexing run with the
model taken out, and the main process's CPU time per image), a tutorial-style baseline
(AutoProcessor + full SiglipModel, one image at a time, dummy text), int8 speed-up and cosine
on CPU, and text-query latency.

    python benchmarks/embed.py --quick --json              # CPU, within 10 minutes on 2 cores
    python benchmarks/embed.py --device cuda --json        # GPU, bf16, batch from free memory
    python benchmarks/embed.py --host-only --images 400 --json   # the host side alone, no model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from indexer.workers import SupervisedPool  # noqa: E402
from retrieval.model import acceleration  # noqa: E402
from retrieval.model import TextEncoder, VisionEncoder, resolve_checkpoint, select_device  # noqa: E402

#: MedSigLIP-448's shapes (model card / config): both towers 27 layers, width 1152.
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
              num_attention_heads=16, patch_size=14, image_size=448)
TEXT = dict(vocab_size=32000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
            num_attention_heads=16, max_position_embeddings=64, projection_size=1152)
#: Dense bf16 tensor-core peak from NVIDIA's H100/H200 SXM datasheet (TFLOP/s).
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L4": 121.0}
QUERIES = ["left pneumothorax", "right pleural effusion", "cardiomegaly", "lung nodule",
           "rib fracture", "pulmonary edema", "consolidation in the lower lobe", "no finding",
           "atelectasis", "a chest x-ray showing pneumonia", "mass in the upper lobe",
           "bilateral opacities", "hemorrhage in the brain", "knee fracture", "normal tissue",
           "melanoma on the back", "diabetic retinopathy", "infarct", "glaucoma", "tumor tissue"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the checkpoint --------------------------------------------------------------------------
def full_size_checkpoint(cache_dir: Path) -> Path:
    """A full-size random SigLIP (both towers) with tokenizer and image processor, made once."""
    folder = cache_dir / "medsiglip-448-random"
    if (folder / "config.json").is_file() and list(folder.glob("*.safetensors")):
        return folder  # complete: written under another name and renamed at the end
    from transformers import (SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor,
                              SiglipTokenizer)

    from retrieval.model.testmodel import train_tokenizer

    log(f"writing a full-size random checkpoint to {folder} (once) …")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as spm_dir:
        tokenizer = SiglipTokenizer(vocab_file=str(train_tokenizer(Path(spm_dir))),
                                    model_max_length=64)
    processor = SiglipProcessor(image_processor=SiglipImageProcessor(
        size={"height": 448, "width": 448}), tokenizer=tokenizer)
    processor.save_pretrained(tmp)
    torch.manual_seed(0)
    config = SiglipConfig(text_config=dict(TEXT, pad_token_id=1, eos_token_id=1),
                          vision_config=VISION)
    SiglipModel(config).eval().save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def vision_flops_per_image(cfg: dict = VISION) -> float:
    """Multiply-adds ×2 of the vision tower's forward (patch embedding, 27 blocks, pooling head)."""
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2
    patch = 2 * tokens * (3 * cfg["patch_size"] ** 2) * d
    block = 2 * tokens * (4 * d * d + 2 * d * f) + 2 * 2 * tokens * tokens * d
    head = 2 * (tokens * 2 * d * d + 2 * d * d + 2 * d * f) + 2 * 2 * tokens * d
    return float(patch + layers * block + head)


# -- the corpus ------------------------------------------------------------------------------
def _radiograph(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    body = np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.55) / 0.45) ** 2) * 2)
    ribs = 0.15 * np.sin(yy * 40 + np.sin(xx * 6 + seed)) * body
    img = 2800 * body + 400 * ribs + 300 * np.sin(xx * 3 + seed)
    img += rng.normal(0, 25, (n, n)).astype(np.float32)
    return np.clip(img + 200, 0, 4095).astype(np.uint16)


def _write_dicom(path: Path, pixels: np.ndarray, modality: str, seed: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1" if modality == "DX" else "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = modality, "CHEST"
    ds.PatientID, ds.PatientName = f"BENCH{seed:04d}", "Bench^Synthetic"
    ds.StudyDate = "20240102"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
    else:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_corpus(folder: Path, n: int, composition: str, unique: int = 8) -> dict:
    """``unique`` distinct files per kind, hard-linked up to ``n`` files (same bytes to decode,
    no extra disk). radiographs: 2048×2048 12-bit in 16-bit PNG and DICOM (DX); mixed: a
    quarter of those and three quarters 512×512 CT slices (DICOM), as in a hospital archive."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    kinds = ["png2048", "dx2048"] if composition == "radiographs" else ["png2048", "dx2048"] + ["ct512"] * 6
    sources: dict[str, list[Path]] = {}
    for kind in dict.fromkeys(kinds):
        sources[kind] = []
        for i in range(min(unique, n)):
            seed = 100 * list(dict.fromkeys(kinds)).index(kind) + i
            if kind == "png2048":
                path = folder / f"u_{kind}_{i}.png"
                Image.fromarray(_radiograph(2048, seed)).save(path, compress_level=6)
            elif kind == "dx2048":
                path = folder / f"u_{kind}_{i}.dcm"
                _write_dicom(path, _radiograph(2048, seed), "DX", seed)
            else:
                path = folder / f"u_{kind}_{i}.dcm"
                _write_dicom(path, (_radiograph(512, seed) // 2).astype(np.uint16), "CT", seed)
            sources[kind].append(path)
    files = folder / "corpus"
    files.mkdir(exist_ok=True)
    counts: dict[str, int] = {}
    for i in range(n):
        kind = kinds[i % len(kinds)]
        src = sources[kind][(i // len(kinds)) % len(sources[kind])]
        os.link(src, files / f"{i:06d}_{src.name}")
        counts[kind] = counts.get(kind, 0) + 1
    return {"path": str(files), "files": n, "counts": counts,
            "unique": [str(p) for ps in sources.values() for p in ps]}


def _timed_decode(job: tuple[str, int]) -> tuple[str, float]:
    """(kind, seconds) of one file's decode (hash, read, window, pad, resize)."""
    from indexer.decode import DecodeOptions, decode_source
    from indexer.sources import SourceFile

    path, image_size = job
    st = os.stat(path)
    source = SourceFile(path, st.st_size, st.st_mtime_ns, "dicom" if path.endswith(".dcm") else "image")
    start = time.perf_counter()
    decoded = decode_source(source, DecodeOptions(image_size=image_size))
    if decoded.error:
        raise RuntimeError(f"benchmark corpus file failed to decode: {decoded.error}")
    return Path(path).name.split("_")[1], time.perf_counter() - start


def decode_rate(corpus: dict, image_size: int, pool: SupervisedPool | None = None) -> float:
    """Frames per second one worker decodes, in the corpus's proportions.

    Timed inside the decode workers when there are any (their set-up — one thread, the memory
    settings of `indexer.pipeline._init_worker` — is part of the rate), one file per worker
    at a time."""
    jobs = [(path, image_size) for path in corpus["unique"]]
    if pool is not None:
        timed = list(pool.map(_timed_decode, jobs, window=pool.workers))
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a worker process
        try:
            timed = [_timed_decode(job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    seconds: dict[str, list[float]] = {}
    for result in timed:
        if not isinstance(result, tuple):  # the pool's report of a crashed or hung decode
            raise RuntimeError(f"benchmark corpus file failed to decode: {result}")
        kind, elapsed = result
        seconds.setdefault(kind, []).append(elapsed)
    total = sum(corpus["counts"][k] * statistics.mean(v) for k, v in seconds.items())
    return corpus["files"] / total


def real_batch(corpus: dict, image_size: int, batch: int) -> torch.Tensor:
    from indexer.view import read_image

    tensors = [torch.from_numpy(read_image(p, image_size=image_size).tensor)
               for p in corpus["unique"]]
    return torch.stack([tensors[i % len(tensors)] for i in range(batch)])


# -- measurements ----------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(encoder: VisionEncoder, batch: torch.Tensor, iterations: int,
                 warm_up: bool = True) -> tuple[float, np.ndarray]:
    """Images/s of embed_batch on ready (pinned, on CUDA) tensors, after a warm-up."""
    if encoder.device.type == "cuda":
        batch = batch.pin_memory()
    if warm_up:
        encoder.embed_batch(batch[: max(1, min(len(batch), 2))] if encoder.device.type == "cpu" else batch)
        sync(encoder.device)
    start = time.perf_counter()
    for _ in range(iterations):
        out = encoder.embed_batch(batch)
    sync(encoder.device)
    return len(batch) * iterations / (time.perf_counter() - start), out


def pipeline_rate(encoder: VisionEncoder, corpus: dict, root: Path, batch: int, pool) -> dict:
    """Files → committed store through the indexer, with decode workers started while the
    model loaded, as `medsearch index` does."""
    from indexer.pipeline import Indexer
    from retrieval.store import Store, manifest_for

    store = Store.create(root, manifest_for(encoder, "auto"))
    with Indexer(store, encoder, workers=0 if pool is None else None, pool=pool,
                 batch_size=batch, progress=False) as indexer:
        marks = mark_writes(indexer)
        report = indexer.run([corpus["path"]])
    store.close()
    if report.failed:
        raise RuntimeError(f"{report.failed} corpus files failed: {report.failures[:3]}")
    return {"images": report.images, "seconds": report.seconds,
            "images_per_s": report.images / report.seconds, "workers": indexer.workers,
            "steady_images_per_s": steady_rate(marks)}


def mark_writes(indexer) -> list[tuple[float, int]]:
    """(time, images written so far) after every committed batch of an indexing run."""
    marks: list[tuple[float, int]] = []
    after_write = indexer._after_write

    def marked(report, bar, started):
        marks.append((time.perf_counter(), report.images))
        after_write(report, bar, started)

    indexer._after_write = marked
    return marks


def steady_rate(marks: list[tuple[float, int]]) -> float | None:
    """Images/s between the batch that completed a quarter of the run and the last batch:
    the rate once every stage runs, without the run's start (workers, actors, model load)."""
    if len(marks) < 3:
        return None
    total = marks[-1][1]
    first = next(m for m in marks if m[1] >= total / 4)
    if first is marks[-1]:
        return None
    return round((marks[-1][1] - first[1]) / (marks[-1][0] - first[0]), 3)


def ray_rate(checkpoint: Path, corpus: dict, root: Path, batch: int, device: torch.device,
             precision: str, bf16_mode: str) -> dict:
    """The same indexing run on the Ray engine (a local cluster on loopback with this
    machine's cores: one decode task per core but one, one embedding actor, as the local
    engine's workers and model). The cluster's start is not timed; each run's own start
    (actors, model load in them, first decodes) is, and is reported apart."""
    import ray

    from indexer.ray_engine import EmbedderSpec, ModelShape, RayIndexer
    from retrieval.store import Store, manifest_for

    begun = time.perf_counter()
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    start_s = time.perf_counter() - begun
    try:
        ckpt = resolve_checkpoint(str(checkpoint))
        shape = ModelShape.of(ckpt)
        store = Store.create(root, manifest_for(shape, "auto"))
        spec = EmbedderSpec(str(ckpt.path), ckpt.fingerprint, str(device), precision,
                            bf16_mode, threads=torch.get_num_threads(), batch_size=batch)
        with RayIndexer(store, shape, spec, batch_size=batch, progress=False) as indexer:
            marks = mark_writes(indexer)
            report = indexer.run([corpus["path"]])
        store.close()
    finally:
        ray.shutdown()
    if report.failed:
        raise RuntimeError(f"{report.failed} corpus files failed on Ray: {report.failures[:3]}")
    # the first result's wait (worker and actor processes starting, the model loading in
    # the actor) is a fixed cost per run; the steady rate is the per-image one
    return {"ray_images_per_s": round(report.images / report.seconds, 3),
            "ray_seconds": report.seconds,
            "ray_first_result_s": round(indexer.first_result_s or 0.0, 2),
            "ray_steady_images_per_s": steady_rate(marks), "ray_cluster_start_s": round(start_s, 2),
            "ray_actors": indexer.actors, "ray_gpus": indexer.gpus}


class HostOnlyEncoder:
    """The pipeline's encoder with the model taken out: batches still cross to the device and
    come back as unit vectors, so an indexing run measures what the host side alone sustains
    (decoding, transfer between processes, batching, store writes)."""

    def __init__(self, checkpoint, device: torch.device, image_size: int, dim: int) -> None:
        self.checkpoint, self.device, self.precision = checkpoint, device, "none"
        self.image_size, self.dim = image_size, dim

    @classmethod
    def like(cls, encoder: VisionEncoder) -> "HostOnlyEncoder":
        return cls(encoder.checkpoint, encoder.device, encoder.image_size, encoder.dim)

    @classmethod
    def from_config(cls, checkpoint, device: torch.device) -> "HostOnlyEncoder":
        """Shapes from the checkpoint's config alone: no weights loaded for a host-only run."""
        return cls(checkpoint, device, *checkpoint.vision_shape())

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        on_device = acceleration.to_device(batch.float(), self.device)
        level = on_device.mean(dim=(1, 2, 3))  # reads every value that crossed
        vectors = torch.ones(len(batch), self.dim, device=self.device) + level[:, None]
        return torch.nn.functional.normalize(vectors, dim=1).cpu().numpy()


def host_rate(encoder: HostOnlyEncoder, corpus: dict, root: Path, batch: int, pool) -> dict:
    """The indexing run without the model: files/s the host feeds, main-process CPU per image
    (all its threads: receiving decoded frames, stacking batches, writing the store)."""
    import retrieval.store.migrations  # noqa: F401  (a one-off import, not a per-image cost)

    before = resource.getrusage(resource.RUSAGE_SELF)
    pipe = pipeline_rate(encoder, corpus, root, batch, pool)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"host_images_per_s": round(pipe["images_per_s"], 2),
            "host_main_cpu_ms_per_image": round(cpu_s / max(pipe["images"], 1) * 1e3, 2)}


def baseline_rate(checkpoint: Path, corpus: dict, device: torch.device, count: int) -> float:
    """What common tutorials do: AutoProcessor + the full SiglipModel, one image at a time,
    with a dummy text, fp32."""
    from PIL import Image
    from transformers import AutoProcessor, SiglipModel

    from retrieval.model import quiet_transformers

    with quiet_transformers():
        processor = AutoProcessor.from_pretrained(checkpoint)
        model = SiglipModel.from_pretrained(checkpoint).eval().to(device)
    pngs = [p for p in corpus["unique"] if p.endswith(".png")]
    paths = [pngs[i % len(pngs)] for i in range(count + 1)]

    def one(path: str) -> None:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=["a photo"], images=image, padding="max_length",
                           return_tensors="pt").to(device)
        with torch.no_grad():
            out = model(**inputs)
        out.image_embeds.cpu()

    one(paths[0])  # warm-up
    start = time.perf_counter()
    for path in paths[1:]:
        one(path)
    rate = count / (time.perf_counter() - start)
    del model
    return rate


def linear_layer_seconds(rows: int, cfg: dict, repeats: int = 3) -> tuple[float, float]:
    """One block's Linear layers (q, k, v, out, fc1, fc2) on ``rows`` tokens: (fp32, int8) s.

    Dynamic quantisation speeds up only these, and attention, GELU and norms stay fp32, so
    their ratio is the most ``--precision int8`` can give on this CPU, and layers × the int8
    time is the least a text query can cost. Timed alternately, best of ``repeats``."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = [(d, d)] * 4 + [(d, f), (f, d)]
    fp32 = torch.nn.Sequential(*(torch.nn.Linear(i, o) for i, o in shapes)).eval()
    int8 = acceleration.quantize_int8(fp32)  # a quantised copy
    inputs = {width: torch.randn(rows, width) for width in (d, f)}
    best = {"fp32": float("inf"), "int8": float("inf")}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for name, layers in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                for (width, _), layer in zip(shapes, layers):
                    layer(inputs[width])
                best[name] = min(best[name], time.perf_counter() - start)
    return best["fp32"], best["int8"]


def text_latency(checkpoint: Path, store_root: Path, device: str, precision: str,
                 queries: list[str]) -> dict:
    """Text → ranked results with metadata, as `medsearch search` does after loading."""
    from retrieval.search import Searcher
    from retrieval.store import Store

    store = Store.open(store_root, readonly=True)
    searcher = Searcher(store, str(checkpoint), device, precision)
    searcher.text("warm-up query", 10)
    first, repeat = [], []
    for query in queries:
        start = time.perf_counter()
        results = searcher.text(query, 10)
        first.append(time.perf_counter() - start)
        assert results and results[0].path, "search returned no results with metadata"
    for query in queries:
        start = time.perf_counter()
        searcher.text(query, 10)
        repeat.append(time.perf_counter() - start)
    text_precision = searcher.text_encoder.precision
    store.close()
    return {"text_precision": text_precision,
            "text_latency_p50_ms": round(1000 * statistics.median(first), 1),
            "text_latency_p90_ms": round(1000 * float(np.percentile(first, 90)), 1),
            "text_latency_cached_p50_ms": round(1000 * statistics.median(repeat), 2)}


def peak_flops(device: torch.device, precision: str) -> tuple[float, str, float | None]:
    """(peak FLOP/s, where it comes from, measured large-matmul FLOP/s or None)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        sync(device)
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        sync(device)
        measured = 2 * n**3 * 20 / (time.perf_counter() - start)
        if sheet:
            return sheet * 1e12, f"{name}: dense bf16 datasheet {sheet} TFLOP/s", measured
        return measured, f"{name}: measured 8192³ bf16 matmul", measured
    cores = os.cpu_count() or 1
    mhz = 0.0
    try:
        mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        pass
    avx512 = "avx512f" in open("/proc/cpuinfo").read()
    per_cycle = 64 if avx512 else 32  # fp32 FLOPs per cycle per core: 2 FMA units × lanes × 2
    ghz = (mhz or 2500.0) / 1000
    return (cores * per_cycle * ghz * 1e9,
            f"{cores} cores × {per_cycle} fp32 FLOP/cycle ({'AVX-512' if avx512 else 'AVX2'} FMA ×2) "
            f"× {ghz:.2f} GHz", None)


def machine(device: torch.device) -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--quick", action="store_true", help="few images (CPU: within 10 minutes on 2 cores)")
    parser.add_argument("--images", type=int, help="files in the corpus")
    parser.add_argument("--batch-size", type=int, help="default: 8 on CPU (quick: 2), from free memory on CUDA")
    parser.add_argument("--workers", type=int,
                        help="decode processes (default: cores - 1, at most 8; 0: decode inline)")
    parser.add_argument("--iterations", type=int, help="timed forward batches")
    parser.add_argument("--corpus", choices=["mixed", "radiographs"], default="mixed")
    parser.add_argument("--unique", type=int, default=8, help="distinct files per kind (the rest hard links)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision tower")
    parser.add_argument("--bf16-mode", choices=["autocast", "weights"],
                        help="CUDA bf16 as autocast over fp32 weights, or bf16 weights")
    parser.add_argument("--checkpoint", type=Path,
                        help="a local SigLIP checkpoint (e.g. the real MedSigLIP-448) instead of "
                             "the full-size random one")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "MEDSEARCH_BENCH_CACHE", Path.home() / ".cache" / "medsearch-bench")))
    parser.add_argument("--baseline-images", type=int)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--skip-host", action="store_true")
    parser.add_argument("--host-only", action="store_true",
                        help="only the indexing run without the model (no forward, int8, baseline, text)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: also index the corpus with the Ray engine (a local cluster) "
                             "and report its images/s and overhead next to the local engine's")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.engine == "ray" and args.host_only:
        parser.error("--engine ray needs the model (its actors load it): drop --host-only, "
                     "or use a small --checkpoint")

    device = select_device(args.device)
    bf16_mode = args.bf16_mode or "weights"
    cuda = device.type == "cuda"
    checkpoint_dir = args.checkpoint or full_size_checkpoint(args.cache_dir)
    checkpoint = resolve_checkpoint(str(checkpoint_dir))
    from indexer.pipeline import decode_pool

    pool = decode_pool(args.workers).start() if args.workers != 0 else None  # as the CLI: before the model
    loading = time.perf_counter()
    encoder = (HostOnlyEncoder.from_config(checkpoint, device) if args.host_only else
               VisionEncoder(checkpoint, str(device), args.precision, args.compile,
                             cuda_bf16=bf16_mode))
    model_load_s = time.perf_counter() - loading
    config = getattr(getattr(encoder, "model", None), "config", None)
    attention = config._attn_implementation if config is not None else "?"
    batch = args.batch_size or (acceleration.auto_batch_size(device) if cuda else (2 if args.quick else 8))
    images = args.images or (batch * (16 if cuda else 2 if args.quick else 4))
    iterations = args.iterations or (10 if cuda else 1)
    log(f"device {device}, precision {encoder.precision} (auto here: "
        f"{acceleration.precision_choice(device)['reason']}), attention {attention}, "
        f"batch {batch}, {images} files ({args.corpus})")

    work = Path(tempfile.mkdtemp(prefix="medsearch-bench-"))
    try:
        corpus = make_corpus(work / "files", images, args.corpus, args.unique)
        decode_fps = decode_rate(corpus, encoder.image_size, pool)
        log(f"decode: {decode_fps:.1f} frames/s per worker")
        if args.host_only:
            doc = {"device": str(device), "machine": machine(device), "batch_size": batch,
                   "workers": pool.workers if pool else 0, "images": images,
                   "corpus": {k: corpus[k] for k in ("files", "counts")},
                   "decode_frames_per_s_per_worker": round(decode_fps, 2),
                   **host_rate(encoder, corpus, work / "host-store", batch, pool)}
            return print_doc(doc, args.json)
        inputs = real_batch(corpus, encoder.image_size, batch)
        forward, fp32_out = forward_rate(encoder, inputs, iterations)
        log(f"forward: {forward:.3f} images/s")
        pipe = pipeline_rate(encoder, corpus, work / "store", batch, pool)
        log(f"pipeline: {pipe}")
        # the same forward again after the pipeline: the machine's speed drifts (±10% over
        # minutes on a shared CPU), so the pipeline is compared with the mean of both sides
        forward_after, _ = forward_rate(encoder, inputs, iterations, warm_up=False)
        forward_before, forward = forward, (forward + forward_after) / 2
        log(f"forward after the pipeline: {forward_after:.3f} images/s")
        flops = vision_flops_per_image()
        peak, peak_source, measured_peak = peak_flops(device, encoder.precision)
        doc = {
            "device": str(device), "machine": machine(device), "precision": encoder.precision,
            "precision_auto": acceleration.precision_choice(device),  # what auto picks, and why
            "attention": attention, "compiled": args.compile,
            "bf16_mode": bf16_mode if cuda else None, "batch_size": batch,
            "workers": pipe["workers"], "corpus": {k: corpus[k] for k in ("files", "counts")},
            "images": pipe["images"],
            "images_per_s": round(pipe["images_per_s"], 3),
            "forward_images_per_s": round(forward, 3),
            "forward_before_after": [round(forward_before, 3), round(forward_after, 3)],
            "pipeline_efficiency": round(pipe["images_per_s"] / forward, 3),
            "flops_per_image": flops,
            "peak_flops": peak, "peak_source": peak_source,
            "mfu": round(forward * flops / peak, 4),
            "mfu_end_to_end": round(pipe["images_per_s"] * flops / peak, 4),
            "decode_frames_per_s_per_worker": round(decode_fps, 2),
            "model_load_s": round(model_load_s, 2),
            "pool_start_s": pool.start_seconds if pool else None,
            "pipeline_seconds": pipe["seconds"],
        }
        if args.engine == "ray":
            doc.update(ray_rate(checkpoint_dir, corpus, work / "ray-store", batch, device,
                                encoder.precision, bf16_mode))
            # the local engine again after Ray: a shared machine's speed drifts over minutes,
            # so Ray is compared with the mean of the local runs on either side of it
            after = pipeline_rate(encoder, corpus, work / "store-after-ray", batch, pool)
            local = (pipe["images_per_s"] + after["images_per_s"]) / 2
            steady = [r["steady_images_per_s"] for r in (pipe, after) if r["steady_images_per_s"]]
            doc["local_images_per_s_before_after"] = [round(pipe["images_per_s"], 3),
                                                      round(after["images_per_s"], 3)]
            doc["local_steady_images_per_s_before_after"] = [pipe["steady_images_per_s"],
                                                             after["steady_images_per_s"]]
            doc["ray_overhead"] = round(1 - doc["ray_images_per_s"] / local, 3)
            doc["steady_images_per_s"] = round(sum(steady) / len(steady), 3) if steady else None
            if doc["ray_steady_images_per_s"] and doc["steady_images_per_s"]:
                doc["ray_steady_overhead"] = round(
                    1 - doc["ray_steady_images_per_s"] / doc["steady_images_per_s"], 3)
            log(f"ray: {doc['ray_images_per_s']} images/s (steady {doc['ray_steady_images_per_s']}; "
                f"first result at {doc['ray_first_result_s']} s), local "
                f"{doc['local_images_per_s_before_after']} "
                f"(steady {doc['steady_images_per_s']}): overhead {doc['ray_overhead']:.1%}, "
                f"steady {doc.get('ray_steady_overhead')}")
        if not args.skip_host:
            doc.update(host_rate(HostOnlyEncoder.like(encoder), corpus, work / "host-store",
                                 batch, pool))
            log(f"host side alone: {doc['host_images_per_s']} images/s, "
                f"{doc['host_main_cpu_ms_per_image']} ms of main-process CPU per image")
        if measured_peak:
            doc["measured_matmul_flops"] = measured_peak
            doc["mfu_vs_measured_matmul"] = round(forward * flops / measured_peak, 4)
        reference = encoder if doc["precision"] == "fp32" and not cuda else None
        del encoder
        gc.collect()
        if cuda and doc["precision"] == "bf16":  # how far bf16 moves the embedding
            ref = VisionEncoder(checkpoint, str(device), "fp32").embed_batch(inputs[:16])
            cos = (ref * fp32_out[:16]).sum(axis=1)
            doc["bf16_cosine_vs_fp32"] = round(float(cos.min()), 5)
            gc.collect()
            torch.cuda.empty_cache()
        def int8_part() -> dict:
            """int8 against fp32 timed alternately (best of three each): a CPU's speed drifts
            by 10–20% over minutes, more than a separate measurement could tell apart."""
            int8 = VisionEncoder(checkpoint, "cpu", "int8")
            int8_rate, int8_out = forward_rate(int8, inputs, iterations)
            fp32_rate = max(forward_before, forward_after)
            if reference is not None:
                for _ in range(2):
                    fp32_rate = max(fp32_rate, forward_rate(reference, inputs, iterations, False)[0])
                    int8_rate = max(int8_rate, forward_rate(int8, inputs, iterations, False)[0])
            cos = (int8_out * fp32_out).sum(axis=1)
            tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2
            linear_fp32, linear_int8 = linear_layer_seconds(len(inputs) * tokens, VISION)
            log(f"int8: {int8_rate:.3f} images/s (fp32 {fp32_rate:.3f}), cosine min {cos.min():.5f}; "
                f"its Linear layers alone {linear_fp32 / linear_int8:.2f}× fp32")
            return {"int8_images_per_s": round(int8_rate, 3),
                    "int8_fp32_images_per_s": round(fp32_rate, 3),
                    "int8_speedup": round(int8_rate / fp32_rate, 3) if reference is not None else None,
                    "int8_linear_speedup": round(linear_fp32 / linear_int8, 3),
                    "int8_cosine": round(float(cos.min()), 5),
                    "int8_cosine_against": doc["precision"],  # the run's own precision
                    "int8_cosine_mean": round(float(cos.mean()), 5)}

        def baseline_part() -> dict:
            count = args.baseline_images or (2 if args.quick else 4 if not cuda else 64)
            base = baseline_rate(checkpoint_dir, corpus, device, count)
            log(f"baseline: {base:.3f} images/s")
            return {"baseline_images_per_s": round(base, 3),
                    "speedup_vs_baseline": round(pipe["images_per_s"] / base, 2)}

        def text_part() -> dict:
            queries = QUERIES[: 10 if args.quick else 20]
            out = text_latency(checkpoint_dir, work / "store", str(device),
                               "int8" if not cuda else "auto", queries)
            if out["text_precision"] == "int8":
                linear_int8 = linear_layer_seconds(TEXT["max_position_embeddings"], TEXT)[1]
                out["text_int8_linear_ms"] = round(1000 * TEXT["num_hidden_layers"] * linear_int8, 1)
            log(f"text: p50 {out['text_latency_p50_ms']} ms "
                f"(its int8 Linear layers alone: {out.get('text_int8_linear_ms')} ms)")
            return out

        parts = [("int8", int8_part, not args.skip_int8 and not cuda),
                 ("baseline", baseline_part, not args.skip_baseline),
                 ("text", text_part, not args.skip_text)]
        for name, part, wanted in parts:
            if not wanted:
                continue
            try:
                doc.update(part())
            except Exception as exc:  # report what was measured, and say what was not
                doc[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            if name == "int8":
                reference = None  # free the fp32 tower before the baseline loads its own
            gc.collect()
    finally:
        if pool is not None:
            pool.close()
        shutil.rmtree(work, ignore_errors=True)
    return print_doc(doc, args.json)


def print_doc(doc: dict, as_json: bool) -> dict:
    """The one result document on stdout (one line with --json)."""
    print(json.dumps(doc) if as_json else json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()

"""Decompression bombs and hostile geometry: refused from the declared header, in bounded memory.

Every bomb is crafted here, byte by byte where a writer would refuse to make it: a tiny PNG
declaring 24,000² pixels, an RLE DICOM declaring 16,384² that really decodes to that many
zeros, a native DICOM whose header declares 16,384² over a short pixel data element, and
multi-frame files where a frame nobody wants is broken or huge. The memory bound is measured
in a fresh process (peak RSS growth around one decode), never a timing.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from indexer.decode import DecodeOptions, decode_source
from indexer.sources import SourceFile

ROOT = Path(__file__).resolve().parents[2]
#: A refusal must not cost more than this much resident memory beyond the imports.
MEMORY_BOUND_MB = 300


# -- crafting ---------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int = 24_000) -> Path:
    """A valid greyscale PNG of side² zero pixels: ~0.55 MB on disk, side² bytes decoded."""
    packer = zlib.compressobj(9)
    rows = bytes(side + 1) * 200  # filter byte + one row of zeros, 200 rows at a time
    body = [packer.compress(rows) for _ in range(side // 200)]
    body.append(packer.compress(bytes(side + 1) * (side % 200)))
    body.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                     + _chunk(b"IDAT", b"".join(body)) + _chunk(b"IEND", b""))
    return path


def _dicom(rows: int, cols: int, syntax, pixel_data: bytes, **extra) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixel_data
    return ds


def rle_bomb(path: Path, side: int = 16_384) -> Path:
    """An RLE Lossless DICOM of side² zero pixels that really decodes: ~4 MB on disk."""
    runs = b"\x81\x00" * (side * side // 128)  # PackBits: 128 copies of 0, two bytes each
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    ds = _dicom(side, side, RLELossless, encapsulate([header + runs]))
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def native_bomb(path: Path, side: int = 16_384) -> Path:
    """Uncompressed DICOM whose header declares side² pixels over 1 KB of pixel data."""
    ds = _dicom(side, side, ExplicitVRLittleEndian, bytes(1024))
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_dicom_bomb(path: Path, side: int = 40_000) -> Path:
    """JPEG Baseline DICOM whose header says 64² but whose codestream's SOF declares side²."""
    import io

    from pydicom.uid import JPEGBaseline8Bit

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)  # height, width
    ds = _dicom(64, 64, JPEGBaseline8Bit, encapsulate([bytes(data)]))
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _source(path: Path, kind: str) -> SourceFile:
    st = path.stat()
    return SourceFile(str(path), st.st_size, st.st_mtime_ns, kind)


def _decode(path: Path, kind: str, frames: str = "middle"):
    return decode_source(_source(path, kind), DecodeOptions(image_size=32, frames=frames))


def _measured(files: dict[str, tuple[Path, str]]) -> dict[str, dict]:
    """Decode each file in one fresh interpreter; per file the outcome and the growth of the
    peak RSS (MB) its decode caused (the peak only grows, so each figure bounds that file)."""
    script = """
import json, os, resource, sys
from indexer.decode import DecodeOptions, decode_source
from indexer.sources import SourceFile
out = {}
for name, path, kind in json.loads(sys.argv[1]):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = decode_source(SourceFile(path, os.path.getsize(path), 0, kind), DecodeOptions(image_size=32))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out[name] = {"error": d.error, "frames": len(d.frames), "growth_mb": (after - before) / 1024}
print(json.dumps(out))
"""
    todo = json.dumps([[name, str(path), kind] for name, (path, kind) in files.items()])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, todo], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- bombs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    return {"png": png_bomb(folder / "bomb.png"), "rle": rle_bomb(folder / "bomb_rle.dcm"),
            "native": native_bomb(folder / "bomb_native.dcm"),
            "jpeg": jpeg_dicom_bomb(folder / "bomb_jpeg.dcm")}


@pytest.fixture(scope="module")
def measured(bombs):
    return _measured({"png": (bombs["png"], "image"), "rle": (bombs["rle"], "dicom"),
                      "jpeg": (bombs["jpeg"], "dicom")})


def test_png_bomb_is_refused_from_its_header_in_bounded_memory(bombs, measured):
    assert bombs["png"].stat().st_size < 1_000_000
    out = measured["png"]
    assert out["frames"] == 0 and out["error"], out
    assert "24000×24000" in out["error"] and "pixel" in out["error"], out["error"]
    assert out["growth_mb"] < MEMORY_BOUND_MB, out


def test_rle_dicom_bomb_is_refused_before_any_pixel_allocation(bombs, measured):
    assert bombs["rle"].stat().st_size < 8_000_000
    out = measured["rle"]
    assert out["frames"] == 0 and out["error"], out
    assert "Rows" in out["error"] and "Columns" in out["error"], out["error"]
    assert "16384" in out["error"], out["error"]
    assert out["growth_mb"] < MEMORY_BOUND_MB, out


def test_native_dicom_declaring_huge_geometry_names_the_fields(bombs):
    decoded = _decode(bombs["native"], "dicom")
    assert decoded.error and not decoded.frames
    assert "Rows" in decoded.error and "Columns" in decoded.error and "16384" in decoded.error


@pytest.mark.parametrize("field, value", [
    ("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 0), ("SamplesPerPixel", 7),
    ("BitsAllocated", 0), ("BitsAllocated", 12), ("BitsAllocated", 128), ("NumberOfFrames", 0),
    ("NumberOfFrames", -3), ("NumberOfFrames", 100_000_000),
])
def test_absurd_pixel_module_values_are_refused_naming_the_field(tmp_path, field, value):
    ds = _dicom(8, 8, ExplicitVRLittleEndian, bytes(64))
    setattr(ds, field, value)
    path = tmp_path / "odd.dcm"
    ds.save_as(path, enforce_file_format=True)
    decoded = _decode(path, "dicom")
    assert decoded.error and not decoded.frames, decoded
    assert field in decoded.error, decoded.error


def test_a_plain_small_dicom_still_decodes(tmp_path):
    ds = _dicom(8, 8, ExplicitVRLittleEndian, bytes(range(64)))
    ds.save_as(tmp_path / "ok.dcm", enforce_file_format=True)
    decoded = _decode(tmp_path / "ok.dcm", "dicom")
    assert decoded.error is None and len(decoded.frames) == 1


# -- multi-frame images: only the wanted frames are decoded -------------------------------------
def _break_last_apng_frame(path: Path) -> None:
    """Garbage in the last fdAT's deflate stream, with a valid CRC (so only decoding it fails)."""
    data = bytearray(path.read_bytes())
    at, last = 8, None
    while at < len(data):
        length = struct.unpack(">I", data[at:at + 4])[0]
        if data[at + 4:at + 8] == b"fdAT":
            last = (at, length)
        at += 12 + length
    at, length = last
    garbage = bytes(data[at + 8:at + 12]) + bytes((i * 37 + 11) % 256 for i in range(length - 4))
    data[at + 8:at + 8 + length] = garbage
    data[at + 8 + length:at + 12 + length] = struct.pack(">I", zlib.crc32(b"fdAT" + garbage))
    path.write_bytes(bytes(data))


def _frames(count: int, side: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)) for _ in range(count)]


def test_apng_decodes_only_up_to_the_wanted_frame(tmp_path):
    path = tmp_path / "anim.png"
    first, *rest = _frames(30)
    first.save(path, save_all=True, append_images=rest, duration=40)
    _break_last_apng_frame(path)
    for policy in ("first", "middle"):
        decoded = _decode(path, "image", policy)
        assert decoded.error is None, decoded.error
        assert [f.index for f in decoded.frames] == ([0] if policy == "first" else [15])
    assert _decode(path, "image", "all").error  # the broken last frame is still reported


def test_multipage_tiff_decodes_only_the_wanted_page(tmp_path):
    path = tmp_path / "stack.tif"
    first, *rest = _frames(7)
    first.save(path, save_all=True, append_images=rest, compression="tiff_adobe_deflate")
    with Image.open(path) as img:
        img.seek(6)
        offset, count = img.tag_v2[273][0], img.tag_v2[279][0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes((i * 53 + 7) % 256 for i in range(count))
    path.write_bytes(bytes(data))
    decoded = _decode(path, "image", "middle")
    assert decoded.error is None, decoded.error
    assert [f.index for f in decoded.frames] == [3]
    assert _decode(path, "image", "all").error


def test_apng_whose_wanted_frame_costs_too_many_decodes_is_refused(tmp_path, monkeypatch):
    """Reaching frame N of an APNG means decoding every frame before it: that is budgeted."""
    import indexer.limits as limits

    path = tmp_path / "long.png"
    first, *rest = _frames(40, side=128)
    first.save(path, save_all=True, append_images=rest, duration=40)
    monkeypatch.setattr(limits, "MAX_DECODED_PIXELS", 128 * 128 * 10)
    decoded = _decode(path, "image", "middle")
    assert decoded.error and "frame" in decoded.error, decoded


# -- the live server ----------------------------------------------------------------------------
def test_server_answers_422_to_an_upload_bomb_and_stays_up(tmp_path, tiny_model, bombs):
    import httpx

    from tests.conftest import write_images
    from tests.serving import index_store, make_app, running

    images = tmp_path / "images"
    write_images(images, 3, seed=5)
    index_store(tmp_path / "store", images, tiny_model)
    with running(make_app(tmp_path / "store")) as url, httpx.Client(base_url=url, timeout=120) as c:
        for name in ("png", "rle", "jpeg"):
            answer = c.post("/similar", files={"file": (name, bombs[name].read_bytes())},
                            data={"k": "1"})
            assert answer.status_code == 422, (answer.status_code, answer.text[:500])
            assert "pixel" in answer.text or "Rows" in answer.text, answer.text
        good = next(images.iterdir())
        answer = c.post("/similar", files={"file": ("q", good.read_bytes())}, data={"k": "1"})
        assert answer.status_code == 200 and answer.json()["results"], answer.text[:500]


def test_isolated_decode_turns_running_out_of_memory_into_an_error(tmp_path):
    """Under the limits but over the child's memory cap: an error comes back, no crash here."""
    from indexer.isolation import decode_isolated

    side = 3000
    ramp = np.tile(np.arange(side, dtype=np.uint16)[None, :] * 20, (side, 1))
    Image.fromarray(ramp).save(tmp_path / "big.png")  # 16-bit grey, 9 M pixels
    source, options = _source(tmp_path / "big.png", "image"), DecodeOptions(image_size=32)
    starved = decode_isolated(source, options, memory_bytes=32 << 20)
    assert starved.error and "memory" in starved.error and not starved.frames, starved.error
    fine = decode_isolated(source, options)
    assert fine.error is None and len(fine.frames) == 1
    direct = decode_source(source, options)
    np.testing.assert_array_equal(fine.frames[0].planes, direct.frames[0].planes)


def test_compressed_frame_declaring_more_than_the_header_is_refused(measured):
    out = measured["jpeg"]
    assert out["frames"] == 0 and out["error"], out
    assert "40000×40000" in out["error"] and "Rows" in out["error"], out["error"]
    assert out["growth_mb"] < MEMORY_BOUND_MB, out


def test_isolated_decode_that_overruns_its_time_is_stopped(tmp_path):
    from indexer.isolation import decode_isolated

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "small.png")
    late = decode_isolated(_source(tmp_path / "small.png", "image"), DecodeOptions(image_size=32),
                           timeout_s=0.001)
    assert late.error and "longer than" in late.error and not late.frames


def test_a_limited_call_that_aborts_dies_plainly_and_says_so(capfd):
    """A C library's abort in the limited child is reported as a crash; crash handlers the
    child inherited (pytest's faulthandler here; a fuzzer's in benchmarks/fuzz.py) stay quiet,
    and the call runs off the caller's stack (a fresh thread), so nothing of the parent's
    call chain can catch what the library throws."""
    import faulthandler
    import threading

    from indexer.isolation import LimitedCallFailed, call_limited

    assert faulthandler.is_enabled()  # pytest's: the handler the child must not run
    name = call_limited(lambda: threading.current_thread().name, (), memory_bytes=64 << 20,
                        timeout_s=30)
    assert name == "limited-call"
    capfd.readouterr()
    with pytest.raises(LimitedCallFailed) as failed:
        call_limited(os.abort, (), memory_bytes=64 << 20, timeout_s=30)
    assert failed.value.crashed and failed.value.exitcode == -6, failed.value
    assert "Fatal Python error" not in capfd.readouterr().err

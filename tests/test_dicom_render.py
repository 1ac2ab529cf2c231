"""Rendering: known pixel statistics after the display steps (real files and files written here)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from indexer.dicom import NoImage, frame_count, read_dataset
from indexer.dicom_frames import decode_stored, dicom_frames, to_display
from indexer.images import DecodeError
from indexer.pixels import PRESETS, Window, apply_window, modality_lut

from .conftest import PYDICOM_TEST_FILES as TF


def render(path: Path | str, index: int = 0, window: str = "file") -> np.ndarray:
    ds = read_dataset(path)
    return next(dicom_frames(ds, path, [index], window))[1]


def write_dicom(path: Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, signed: bool = False, modality: str = "OT",
                sop_class: str = "1.2.840.10008.5.1.4.1.1.7", frames: int | None = None,
                **attrs) -> Path:
    """A real Part-10 file, explicit VR little endian, uncompressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = modality, "PID-123", "Doe^Jane"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if pixels is not None:
        rows, cols = pixels.shape[-2:] if pixels.ndim in (2, 3) and photometric.startswith("MONO") \
            else pixels.shape[-3:-1]
        ds.Rows, ds.Columns = int(rows), int(cols)
        ds.SamplesPerPixel = 1 if photometric.startswith("MONO") else 3
        ds.PhotometricInterpretation = photometric
        if pixels.dtype.kind == "f":
            ds.BitsAllocated = 32
            ds.FloatPixelData = pixels.astype(np.float32).tobytes()
        else:
            ds.BitsAllocated = pixels.dtype.itemsize * 8
            ds.BitsStored = bits_stored or ds.BitsAllocated
            ds.HighBit = ds.BitsStored - 1
            ds.PixelRepresentation = int(signed)
            ds.PixelData = pixels.tobytes()
        if ds.SamplesPerPixel == 3:
            ds.PlanarConfiguration = 0
        if frames:
            ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- grey: windowing, MONOCHROME1, presets -------------------------------------------------
def test_monochrome1_air_is_dark(tmp_path):
    stored = np.full((64, 64), 500, np.uint16)       # dense tissue: little exposure, low values
    stored[:, :32] = 4000                            # air: full exposure, high stored values
    mono1 = render(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1",
                               bits_stored=12, modality="CR"))
    assert mono1[:, :32].mean() < 0.05 and mono1[:, 32:].mean() > 0.95
    mono2 = render(write_dicom(tmp_path / "m2.dcm", stored, bits_stored=12, modality="CR"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)   # inverted exactly once
    windowed = render(write_dicom(tmp_path / "m1w.dcm", stored, photometric="MONOCHROME1",
                                  bits_stored=12, modality="CR", WindowCenter=2048,
                                  WindowWidth=4096))
    assert windowed[:, :32].mean() < 0.1 and windowed[:, 32:].mean() > 0.8


def test_ct_window_maps_hounsfield_units_as_the_file_says(tmp_path):
    ds = pydicom.dcmread(TF / "CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]   # the first one is the default
    path = tmp_path / "ct_windowed.dcm"
    ds.save_as(path)
    stored = decode_stored(read_dataset(path), path, 0)
    hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = 40.0, 400.0
    expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)     # PS3.3 C.11.2.1.2.1
    shown = render(path)
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert shown[hu <= c - w / 2].max() == 0.0 and shown[hu >= c + w / 2].min() == 1.0


def test_ct_presets(tmp_path):
    hu = np.array([[-1000, -600, 40, 1000]] * 4, np.int16)
    path = write_dicom(tmp_path / "ct.dcm", (hu + 1024).astype(np.uint16), modality="CT",
                       sop_class="1.2.840.10008.5.1.4.1.1.2", RescaleIntercept=-1024,
                       RescaleSlope=1, WindowCenter=40, WindowWidth=400)
    for name, (c, w) in PRESETS.items():
        expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        np.testing.assert_allclose(render(path, window=name), expected, atol=1e-6)
    lung, brain = render(path, window="lung")[0], render(path, window="brain")[0]
    assert lung[0] < 0.3 and 0.45 < lung[1] < 0.55 and lung[3] > 0.99    # lung: air grey-dark
    assert brain[0] == 0 and 0.45 < brain[2] < 0.55 and brain[3] == 1    # brain: bone white
    # presets are Hounsfield units: a CR keeps its own (file or percentile) window
    cr = write_dicom(tmp_path / "cr.dcm", (hu + 1024).astype(np.uint16), modality="CR")
    np.testing.assert_allclose(render(cr, window="lung"), render(cr), atol=0)


def test_window_functions():
    x = np.array([-100.0, 0.0, 50.0, 100.0, 200.0])
    linear = apply_window(x, Window(50, 101))
    assert linear[0] == 0 and linear[-1] == 1 and abs(linear[2] - 0.5) < 0.01
    sigmoid = apply_window(x, Window(50, 100, "SIGMOID"))
    assert np.all(np.diff(sigmoid) > 0) and abs(sigmoid[2] - 0.5) < 1e-9
    exact = apply_window(x, Window(50, 0.5, "LINEAR_EXACT"))
    assert set(np.unique(exact)) <= {0.0, 0.5, 1.0}


def test_no_window_falls_back_to_percentiles_and_signed_data(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(-2000, 2000, (64, 64)).astype(np.int16)
    stored[0, 0], stored[0, 1] = -32000, 32000                     # outliers are ignored
    shown = render(write_dicom(tmp_path / "s.dcm", stored, bits_stored=16, signed=True))
    assert shown[0, 0] == 0 and shown[0, 1] == 1
    inner = shown[stored > -1900]
    assert 0.35 < inner.mean() < 0.65 and inner.std() > 0.2
    order = np.argsort(stored.ravel())
    assert np.all(np.diff(shown.ravel()[order]) >= 0)               # monotonic in value


def test_float_pixel_data_is_nan_safe(tmp_path):
    values = np.linspace(0, 10, 32 * 32, dtype=np.float32).reshape(32, 32)
    values[0, :5] = np.nan
    values[1, 0] = np.inf
    shown = render(write_dicom(tmp_path / "f.dcm", values, modality="OT"))
    assert np.isfinite(shown).all() and shown.min() >= 0 and shown.max() <= 1
    assert shown[0, :5].max() == 0.0 and shown[-1, -1] > 0.99


def test_one_bit_segmentation_stays_binary():
    shown = render(TF / "liver_1frame.dcm")
    ds = read_dataset(TF / "liver_1frame.dcm")
    stored = decode_stored(ds, TF / "liver_1frame.dcm", 0)
    assert set(np.unique(shown)) == {0.0, 1.0}
    np.testing.assert_array_equal(shown, stored.astype(np.float32))


# -- colour -------------------------------------------------------------------------------
def test_palette_colour_goes_through_its_lookup_table():
    from pydicom.pixels import apply_color_lut

    ds = read_dataset(TF / "examples_palette.dcm")
    stored = decode_stored(ds, TF / "examples_palette.dcm", 0)
    shown = render(TF / "examples_palette.dcm")
    assert shown.shape == (*stored.shape, 3)
    assert int(ds.RedPaletteColorLookupTableDescriptor[2]) == 16      # 16-bit table entries
    np.testing.assert_allclose(shown, apply_color_lut(stored, ds) / 65535.0, atol=1e-6)
    assert np.abs(shown[..., 0] - shown[..., 2]).max() > 0.2         # it is colour, not grey


YBR_VARIANTS = ["SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
                "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                "SC_rgb_jpeg_lossy_gdcm.dcm", "SC_ybr_full_422_uncompressed.dcm"]


@pytest.mark.parametrize("name", YBR_VARIANTS)
def test_ybr_is_converted_exactly_once(name):
    reference = render(TF / "SC_rgb_rle.dcm")        # the same picture stored as RGB, lossless
    shown = render(TF / name)
    assert np.abs(shown - reference).mean() < 0.02
    # converting again (the classic bug) moves the colours far away: the check can fail
    from pydicom.pixels import convert_color_space

    twice = convert_color_space((shown * 255).astype(np.uint8), "YBR_FULL", "RGB") / 255.0
    assert np.abs(twice - reference).mean() > 0.1


def test_planar_configuration_and_big_endian_match_little_endian():
    np.testing.assert_array_equal(render(TF / "MR_small_bigendian.dcm"), render(TF / "MR_small.dcm"))
    ds = read_dataset(TF / "ExplVR_BigEnd.dcm")
    assert int(ds.PlanarConfiguration) == 1
    shown = render(TF / "ExplVR_BigEnd.dcm")
    assert shown.shape == (60, 80, 3) and shown.std() > 0.05


def test_rgb_16_and_32_bit_scaled_by_bits_stored():
    base = render(TF / "SC_rgb_rle.dcm")
    for name in ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"):
        np.testing.assert_allclose(render(TF / name), base, atol=2e-3)


# -- files the plugins alone cannot read ---------------------------------------------------
def test_12_bit_jpeg_extended_decodes_through_gdcm():
    pytest.importorskip("gdcm")
    ds = read_dataset(TF / "JPGExtended.dcm")
    stored = decode_stored(ds, TF / "JPGExtended.dcm", 0)
    assert stored.shape == (1024, 256) and 0 < stored.max() < 4096
    assert render(TF / "JPGExtended.dcm").std() > 0.05


def test_file_without_meta_or_preamble(tmp_path):
    ds = pydicom.dcmread(TF / "CT_small.dcm")
    bare = tmp_path / "bare.dcm"
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, ds)                  # no preamble, no file meta
    bare.write_bytes(buffer.getvalue())
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(render(bare), render(TF / "CT_small.dcm"))


# -- multi-frame ---------------------------------------------------------------------------
def test_enhanced_multiframe_per_frame_rescale_and_window(tmp_path):
    from pydicom.sequence import Sequence

    hu = np.tile(np.linspace(-1000, 1000, 64), (64, 1))
    stored = np.stack([hu + 1024, (hu + 1024) / 2]).astype(np.uint16)   # frame 1: slope 2

    def group(**elements) -> Dataset:
        item = Dataset()
        for k, v in elements.items():
            setattr(item, k, v)
        return item

    shared = group(PixelValueTransformationSequence=Sequence([group(
        RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU")]))
    per_frame = Sequence([
        group(FrameVOILUTSequence=Sequence([group(WindowCenter=40, WindowWidth=400)])),
        group(PixelValueTransformationSequence=Sequence([group(
            RescaleIntercept=-1024, RescaleSlope=2, RescaleType="HU")]),
              FrameVOILUTSequence=Sequence([group(WindowCenter=-600, WindowWidth=1500)])),
    ])
    path = write_dicom(tmp_path / "enh.dcm", stored, modality="CT", frames=2,
                       sop_class="1.2.840.10008.5.1.4.1.1.2.1",
                       SharedFunctionalGroupsSequence=Sequence([shared]),
                       PerFrameFunctionalGroupsSequence=per_frame)
    ds = read_dataset(path)
    assert frame_count(ds) == 2
    frames = dict(dicom_frames(ds, path, [0, 1]))
    for index, (c, w) in ((0, (40, 400)), (1, (-600, 1500))):
        values = stored[index] * (1 if index == 0 else 2) - 1024.0
        expected = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        np.testing.assert_allclose(frames[index], expected, atol=1e-3)
    assert not np.allclose(frames[0], frames[1])


def test_whole_slide_edge_tiles_smaller_than_the_tile_size(tmp_path):
    tiles = []
    for shape, colour in (((64, 64), (200, 30, 30)), ((40, 24), (30, 200, 30))):
        buffer = io.BytesIO()
        Image.new("RGB", (shape[1], shape[0]), colour).save(buffer, "JPEG", quality=95)
        tiles.append(buffer.getvalue())
    path = write_dicom(tmp_path / "wsi.dcm", None, modality="SM",
                       sop_class="1.2.840.10008.5.1.4.1.1.77.1.6")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = 2
    ds.PixelData = encapsulate(tiles)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    ds = read_dataset(path)
    frames = dict(dicom_frames(ds, path, [0, 1]))
    assert frames[0].shape == frames[1].shape == (64, 64, 3)
    edge = frames[1]
    np.testing.assert_allclose(edge[:40, :24].mean(axis=(0, 1)), np.array([30, 200, 30]) / 255,
                               atol=0.05)
    assert edge[40:, :].max() == 0 and edge[:, 24:].max() == 0       # padding, not stretching


# -- what is not an image -----------------------------------------------------------------
@pytest.mark.parametrize("name, reason", [
    ("test-SR.dcm", "no pixel data: Comprehensive SR Storage (SR)"),
    ("rtstruct.dcm", "no pixel data: RT Structure Set Storage (RTSTRUCT)"),
    ("rtplan.dcm", "no pixel data: RT Plan Storage (RTPLAN)"),
    ("waveform_ecg.dcm", "no pixel data: 12-lead ECG Waveform Storage (ECG)"),
])
def test_objects_without_images_say_what_they_are(name, reason):
    ds = read_dataset(TF / name)
    with pytest.raises(NoImage, match=reason.replace("(", r"\(").replace(")", r"\)")):
        list(dicom_frames(ds, TF / name, [0]))


def test_broken_files_say_why():
    with pytest.raises(DecodeError, match="less than expected"):
        render(TF / "MR_truncated.dcm")
    with pytest.raises(DecodeError, match="NumberOfFrames"):
        render(TF / "badVR.dcm")


def test_modality_lut_ignores_empty_rescale(tmp_path):
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = "", ""
    np.testing.assert_array_equal(modality_lut(np.array([1, 2]), ds), [1.0, 2.0])
    shown = to_display(read_dataset(TF / "MR_small.dcm"),
                       decode_stored(read_dataset(TF / "MR_small.dcm"), None, 0))
    assert shown.dtype == np.float32 and 0 <= shown.min() and shown.max() <= 1


# -- defect 11: faults that used to cost a file with a wrong reason --------------------------------
@pytest.mark.parametrize("keep", ["LUTData", "LUTDescriptor", None])
def test_modality_lut_item_without_descriptor_or_data_falls_back_to_rescale(tmp_path, keep):
    """An incomplete Modality LUT item is ignored: slope/intercept (here from CT_small) apply."""
    from indexer.decode import DecodeOptions, decode_source
    from indexer.view import read_image
    from indexer.sources import SourceFile

    ds = pydicom.dcmread(TF / "CT_small.dcm")
    item = Dataset()
    if keep == "LUTData":
        item.add_new(0x00283006, "US", [0, 1, 2, 3])  # LUTData, its VR given explicitly
    elif keep == "LUTDescriptor":
        item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = [item]
    path = tmp_path / "lut.dcm"
    ds.save_as(path)
    expected = render(TF / "CT_small.dcm")
    np.testing.assert_allclose(render(path), expected, atol=1e-6)
    decoded = decode_source(SourceFile(str(path), path.stat().st_size, 0, "dicom"),
                            DecodeOptions(image_size=32))
    assert decoded.error is None and len(decoded.frames) == 1, decoded.error
    view = read_image(path, image_size=32).display_rgb()  # `medsearch preview`: no traceback
    assert view.shape == (32, 32, 3)


def test_float_parametric_map_with_unit_window_is_not_a_binary_mask(tmp_path):
    """C = 0.5, W = 1 on float data in [0, 1] shows the range 0–1, not a threshold at 0."""
    values = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = write_dicom(tmp_path / "map.dcm", values, sop_class="1.2.840.10008.5.1.4.1.1.30",
                       WindowCenter=0.5, WindowWidth=1.0)
    shown = render(path)
    assert len(np.unique(shown)) > 500                   # a gradient, not two levels
    np.testing.assert_allclose(shown, values, atol=1e-6)  # LINEAR_EXACT over [0, 1]


def test_integer_data_with_unit_window_stays_a_threshold(tmp_path):
    """For integer stored values the standard's LINEAR with W = 1 is a threshold at C - 0.5."""
    values = np.arange(16, dtype=np.uint16).reshape(4, 4)
    shown = render(write_dicom(tmp_path / "int.dcm", values, WindowCenter=8, WindowWidth=1))
    np.testing.assert_array_equal(shown, (values > 7.5).astype(np.float32))

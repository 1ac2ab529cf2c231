"""`medsearch preview`: write exactly the image the model sees, to check windowing and orientation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.errors import InputError

from .main import app
from .options import JsonOpt
from .output import emit


def _model_size(model: str | None, size: int | None) -> int:
    """The input size: given, else the checkpoint's, else MedSigLIP's 448."""
    if size:
        return size
    if model:
        import json

        from retrieval.model import resolve_checkpoint

        config = json.loads((resolve_checkpoint(model).path / "config.json").read_text())
        return int(config.get("vision_config", config).get("image_size", 448))
    return 448


@app.command("preview")
def preview_cmd(
    file: Annotated[Path, typer.Argument(help="Image or DICOM file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")],
    frame: Annotated[Optional[int], typer.Option(
        "--frame", min=0, help="Frame (0-based); default: the middle frame, as indexing does.")] = None,
    window: Annotated[str, typer.Option(
        help="DICOM grey window: file, auto, lung, mediastinum, bone, brain, abdomen, liver.")] = "file",
    size: Annotated[Optional[int], typer.Option(min=16, help="Model input size (default 448).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Take the input size from this checkpoint.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the model's view of FILE (after windowing, padding and resizing) as an 8-bit PNG."""
    from PIL import Image

    from indexer.pixels import check_window_choice
    from indexer.view import DecodeSettings, read_image

    try:
        window = check_window_choice(window)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: write a .png file (lossless, so it shows what the model sees)")
    side = _model_size(model, size)
    image = read_image(file, image_size=side, settings=DecodeSettings(window=window), frame=frame)
    rgb, index, count = image.display_rgb(), image.frame, image.frame_count
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(out)
    emit({"path": str(out.absolute()), "frame": index, "frames": count, "size": side,
          "window": window}, json_out,
         lambda d: f"wrote {d['path']} (frame {d['frame']} of {d['frames']}, {d['size']}×{d['size']})")

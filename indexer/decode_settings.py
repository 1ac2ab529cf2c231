"""How a store's images became model inputs (window, frames, series vectors): recorded in its
manifest and read by every command that opens a store (`medsearch info` too), so this module
imports nothing heavy; the decoding itself is :mod:`indexer.view`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from retrieval.errors import InputError


@dataclass(frozen=True)
class DecodeSettings:
    """How a store's images became model inputs; recorded in its manifest (``decode``)."""

    window: str = "file"          # file | auto | a CT preset (indexer.pixels.PRESETS)
    frames: str = "middle"        # all | first | middle | N
    series_vectors: bool = False  # one mean vector per DICOM series as well

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, recorded: dict | None) -> "DecodeSettings":
        """The recorded settings; the defaults for a store that has none recorded."""
        if not recorded:
            return cls()
        default = cls()
        return cls(window=str(recorded.get("window") or default.window),
                   frames=str(recorded.get("frames") or default.frames),
                   series_vectors=bool(recorded.get("series_vectors", default.series_vectors)))

    def for_query(self) -> "DecodeSettings":
        """A query image is one picture whatever the store embedded of each file: the store's
        window, the middle frame."""
        return replace(self, frames="middle")


def settings_for_run(recorded: dict | None, *, window: str | None = None,
                     frames: str | None = None, series_vectors: bool = False,
                     default_frames: str = "middle") -> DecodeSettings:
    """The settings an index run uses: those given, else those the store recorded.

    A store holds vectors made one way only: mixed windows or frame choices would make its
    previews and similarities lie, so a choice that differs from the recorded one is refused.
    ``series_vectors=False`` means "not asked for" (a store that has them keeps them).
    """
    if recorded is None:
        return DecodeSettings(window=window or "file", frames=frames or default_frames,
                              series_vectors=series_vectors)
    stored = DecodeSettings.from_manifest(recorded)
    asked = {"window": window, "frames": frames, "series_vectors": series_vectors or None}
    differ = {name: value for name, value in asked.items()
              if value is not None and value != getattr(stored, name)}
    if differ:
        was = ", ".join(f"{name} {getattr(stored, name)!r}" for name in differ)
        now = ", ".join(f"{name} {value!r}" for name, value in differ.items())
        raise InputError(f"this store was indexed with {was}; this run asks for {now}. One "
                         "store holds images decoded one way only (mixed settings would make its "
                         "previews and similarities lie): index into another store, or leave "
                         "these choices out to use the store's")
    return stored

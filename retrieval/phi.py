"""The PHI policies: what a store keeps of PatientID (a keyed hash, the ID itself, or nothing).

Its own small module so that the settings can name the choices without loading the store.
"""

from __future__ import annotations

from typing import Literal

PhiPolicy = Literal["hash", "keep", "drop"]
PHI_POLICIES: tuple[str, ...] = PhiPolicy.__args__

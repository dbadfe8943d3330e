"""The detector settings every command that runs the detector exposes as flags."""

from __future__ import annotations

#: The DetectorConfig fields the commands expose; the others keep their defaults.
DETECTOR_FLAGS = ("min_face_size", "thresholds", "scale_factor", "pyramid", "precision")

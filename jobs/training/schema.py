"""The Parquet layout of training samples: the contract between `prepare` and `train`."""

from __future__ import annotations

import pyarrow as pa

from mtcnn.nets import stage_spec

# Sample kinds as stored in the `kind` column.
NEGATIVE, POSITIVE, PART, LANDMARK = 0, 1, 2, 3
KIND_NAMES = {NEGATIVE: "negative", POSITIVE: "positive", PART: "part", LANDMARK: "landmark"}

#: One row per training crop, of the stage's input size (mtcnn.nets.STAGES). `image` holds size*size*3 RGB uint8 bytes in H, W, C order;
#: `box` the offsets (gt_x1 - crop_x1, gt_y1 - crop_y1, gt_x2 - crop_x2, gt_y2 - crop_y2) over
#: the crop side (zeros for negatives and landmark samples); `landmarks` the five x then the
#: five y of the points, (p - crop origin) / crop side (zeros unless kind is LANDMARK).
SAMPLE_SCHEMA = pa.schema([
    pa.field("image", pa.binary(), nullable=False),
    pa.field("size", pa.int16(), nullable=False),
    pa.field("kind", pa.int8(), nullable=False),
    pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
    pa.field("landmarks", pa.list_(pa.float32(), 10), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
])

#: File in a stage folder with what `prepare` did (counts, options); not a shard.
SUMMARY_FILE = "_prepare.json"


def stage_folder(root: str, stage: str) -> str:
    """Where a stage's shards live under a prepare output root (local path or URL)."""
    stage_spec(stage)  # an unknown stage fails here
    return root.rstrip("/") + "/" + stage

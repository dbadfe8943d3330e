"""The paper's training claims, measured: OHEM on vs off, and 1 vs 2 Ray Train workers.

    python benchmarks/training_claims.py --shards RUN/samples/pnet       # shards from prepare
    python benchmarks/training_claims.py --limit 120                     # makes P-Net shards first
    python benchmarks/training_claims.py --stage onet --shards RUN/samples/onet

Prints, per variant, the time per epoch, samples/s, and the trained stage's loss and face/non-face
accuracy on held-out samples (20% of the shards, never trained on). Variants run interleaved,
`--repeats` times each; the fastest repeat counts, so a busy machine disturbs the comparison less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.runtime.ray_env import init_ray  # noqa: E402
from jobs.training.losses import STAGE_TASK_WEIGHTS, multitask_loss  # noqa: E402
from jobs.training.trainer import TrainConfig, decode_samples, train_stage  # noqa: E402
from mtcnn.nets import normalize_pixels  # noqa: E402
from mtcnn.weights import load_weights  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def make_shards(folder: Path, limit: int) -> Path:
    """P-Net samples of the first `limit` WIDER and landmark images, via the prepare job."""
    from jobs.training.prepare_stage import PrepareConfig, prepare_stage
    from jobs.training.samples import SampleConfig

    summary = prepare_stage(PrepareConfig(
        output=str(folder), samples=SampleConfig(stage="pnet", samples_per_image=100, negative_iou=0.3),
        faces=str(DATA / "wider_face_train_small"),
        landmarks=str(DATA / "cnn_facepoint_5pt" / "trainImageList.txt"), limit=limit))
    print("\n".join(summary.lines()))
    return folder / "pnet"


def split_shards(shards: Path, folder: Path, held_out: float, seed: int) -> tuple[Path, Path]:
    """Rows shuffled into train/ and validation/ Parquet folders."""
    table = pads.dataset(str(shards), format="parquet").to_table()
    order = np.random.default_rng(seed).permutation(table.num_rows)
    cut = int(table.num_rows * (1 - held_out))
    paths = []
    for name, rows in (("train", order[:cut]), ("validation", order[cut:])):
        (folder / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(pa.array(rows)), folder / name / "part-0.parquet",
                       row_group_size=4096)
        paths.append(folder / name)
    return paths[0], paths[1]


def held_out_scores(weights_path: str, stage: str, validation: Path) -> dict:
    """Loss and face/non-face accuracy of a trained stage on samples it never saw."""
    net = load_weights(weights_path).stages[stage].eval()
    arrays = decode_samples(pads.dataset(str(validation), format="parquet").to_table())
    with torch.inference_mode():
        pixels = normalize_pixels(torch.from_numpy(arrays["pixels"]).permute(0, 3, 1, 2).float())
        terms = multitask_loss(net(pixels), torch.from_numpy(arrays["kind"]),
                               torch.from_numpy(arrays["box"]), torch.from_numpy(arrays["landmarks"]),
                               STAGE_TASK_WEIGHTS[stage])
    return {"val_loss": terms.total.item(), "val_face_loss": terms.classification.item(),
            "val_box_loss": terms.box.item(), "val_accuracy": terms.correct / max(terms.classified, 1)}


def run_variant(name: str, train: Path, validation: Path, folder: Path, args, **settings) -> dict:
    """Train the stage once with the given settings and summarise it."""
    config = TrainConfig(stage=args.stage, data=str(train), output=str(folder / name), epochs=args.epochs,
                         batch_size=args.batch_size, learning_rate=args.learning_rate,
                         seed=args.seed, log_every=0, **settings)
    summary = train_stage(config)
    # The first epoch pays for starting the data pipeline; later ones show the steady state.
    steady = summary.history[1:] or summary.history
    row = {
        "variant": name,
        "epoch_seconds": statistics.median(m["epoch_seconds"] for m in steady),
        "samples_per_second": statistics.median(m["samples_per_second"] for m in steady),
        "train_loss": summary.metrics["loss"],
        "train_accuracy": summary.metrics["accuracy"],
        "run_seconds": summary.seconds,
        **held_out_scores(summary.weights_path, args.stage, validation),
    }
    row["load_average"] = os.getloadavg()[0]  # other work on the machine skews the timings
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def best_of(rows: list[dict]) -> dict:
    """One variant's repeats: the fastest epoch time, the mean of the quality figures."""
    fastest = min(rows, key=lambda r: r["epoch_seconds"])
    merged = dict(fastest)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        merged[key] = statistics.mean(r[key] for r in rows)
    merged["repeats"] = len(rows)
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="sample shards of --stage (default: prepare P-Net's)")
    parser.add_argument("--stage", choices=["pnet", "rnet", "onet"], default="pnet")
    parser.add_argument("--limit", type=int, default=120, help="images per list when preparing")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.stage != "pnet" and args.shards is None:
        parser.error(f"--stage {args.stage} needs --shards: its samples are mined with trained stages")

    init_ray(num_cpus=args.num_cpus)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shards = args.shards or make_shards(folder / "samples", args.limit)
        train, validation = split_shards(shards, folder / "split", args.held_out, args.seed)
        variants = {
            # Same data, same single worker: only the loss differs.
            "ohem-off-1-worker": dict(num_workers=1, cpus_per_worker=1.0, ohem=False),
            "ohem-on-1-worker": dict(num_workers=1, cpus_per_worker=1.0, ohem=True),
            # One thread per worker either way (Ray sets OMP_NUM_THREADS from the CPUs given),
            # so the second worker is the only thing added.
            "ohem-off-2-workers": dict(num_workers=2, cpus_per_worker=0.5, ohem=False),
        }
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, settings in variants.items():
                runs[name].append(run_variant(name, train, validation, folder / f"r{repeat}", args,
                                              **settings))
        rows = [best_of(runs[name]) for name in variants]
    print()
    print(f"{'variant':22} {'s/epoch':>8} {'samples/s':>10} {'train acc':>9} {'val acc':>8} {'val loss':>9}")
    for row in rows:
        print(f"{row['variant']:22} {row['epoch_seconds']:8.1f} {row['samples_per_second']:10.0f} "
              f"{row['train_accuracy']:9.3f} {row['val_accuracy']:8.3f} {row['val_loss']:9.4f}")
    off, on, two = rows
    print(f"\nOHEM on / off: time per epoch x{on['epoch_seconds'] / off['epoch_seconds']:.2f}, "
          f"held-out accuracy {on['val_accuracy']:.3f} vs {off['val_accuracy']:.3f}")
    print(f"2 / 1 workers: samples/s x{two['samples_per_second'] / off['samples_per_second']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the trained cascade's accuracy grows with the number of face images it is trained on.

Runs the whole training recipe (`mtcnn-jobs train --config`) on spread subsets of a WIDER training
set (every k-th image, so each subset keeps all events), the same settings otherwise, then
`mtcnn-jobs evaluate` on each, and prints AP and landmark error per subset size. It answers
whether more data or more training would close a gap to the reference: if AP climbs with every
doubling of the images, the data is the limit.

    python benchmarks/training_data_scaling.py --config configs/shared-data.yaml \\
        --sizes 100,200 --output runs/scaling [--wider-val DIR] [--landmarks LIST]

Each subset is a gt file written under --output with a link to the original images (nothing is
copied); each run goes to --output/run<N>. Finished runs are reused, so a stopped sweep continues.
Every run takes the recipe's time scaled by its share of the images (the full shared-data recipe
takes 38-46 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def wider_records(gt_file: Path) -> list[list[str]]:
    """The lines of a WIDER gt file, grouped per image (name, count, face rows)."""
    lines = gt_file.read_text().splitlines()
    records, index = [], 0
    while index < len(lines):
        count = int(lines[index + 1])
        size = 2 + max(count, 1)  # an image without faces still has one row of zeros
        records.append(lines[index:index + size])
        index += size
    return records


def spread_subset(sources: list[Path], size: int, folder: Path) -> list[Path]:
    """WIDER folders of `size` images in all, spread evenly over the sources' images together.

    One subset folder per source (each links its source's images/), so the recipe gets a list.
    """
    records = [(index, record) for index, source in enumerate(sources)
               for record in wider_records(next(source.glob("*_bbx_gt.txt")))]
    if size > len(records):
        raise SystemExit(f"--sizes {size}: the sources hold only {len(records)} images")
    step = len(records) / size
    chosen = [records[int(i * step)] for i in range(size)]
    subsets = []
    for index, source in enumerate(sources):
        mine = [record for owner, record in chosen if owner == index]
        if not mine:
            continue
        subset = folder / source.name
        subset.mkdir(parents=True, exist_ok=True)
        gt_name = next(source.glob("*_bbx_gt.txt")).name
        (subset / gt_name).write_text("\n".join(line for record in mine for line in record) + "\n")
        images = subset / "images"
        if not images.exists():
            images.symlink_to((source / "images").resolve(), target_is_directory=True)
        subsets.append(subset)
    return subsets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shared-data.yaml",
                        help="recipe whose `faces` are WIDER folders; every other setting is kept")
    parser.add_argument("--sizes", default="100,200", help="face images per run, comma-separated")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--wider-val", type=Path, default=DATA / "wider_face_val_dev")
    parser.add_argument("--landmarks", type=Path, default=DATA / "cnn_facepoint_5pt" / "testImageList.txt")
    args = parser.parse_args()

    from jobs.training.recipe import load_recipe

    recipe = load_recipe(args.config)
    sources = [Path(face) for face in ([recipe.faces] if isinstance(recipe.faces, str) else recipe.faces)]
    if not all(source.is_dir() and any(source.glob("*_bbx_gt.txt")) for source in sources):
        raise SystemExit(f"{args.config}: `faces` must be WIDER folders to take subsets of")
    settings = yaml.safe_load(args.config.read_text())
    rows = []
    for size in (int(v) for v in args.sizes.split(",")):
        subsets = spread_subset(sources, size, args.output / f"wider{size}")
        config = args.output / f"recipe{size}.yaml"
        # Unsorted: the recipe takes its stages in the order written (pnet, rnet, onet).
        config.write_text(yaml.safe_dump({**settings, "faces": [str(s.resolve()) for s in subsets],
                                          "landmarks": recipe.landmarks, "limit": None}, sort_keys=False))
        run = args.output / f"run{size}"
        started = time.perf_counter()
        print(f"[scaling] {size} face images: training into {run}", flush=True)
        subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--config", str(config),
                        "--output", str(run)], check=True, cwd=ROOT)
        minutes = (time.perf_counter() - started) / 60
        evaluation = args.output / f"eval{size}"
        subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--weights", str(run),
                        "--wider", str(args.wider_val), "--landmarks", str(args.landmarks),
                        "--min-face-size", "20", "--output", str(evaluation)], check=True, cwd=ROOT)
        metrics = json.loads((evaluation / "metrics.json").read_text())
        rows.append((size, minutes, metrics))
    print("\nface images | minutes (0 = reused) | AP easy / medium / hard | NME mean")
    for size, minutes, metrics in rows:
        ap = metrics["wider"]["ap"]
        print(f"{size:11d} | {minutes:7.1f} | {ap['easy']:.3f} / {ap['medium']:.3f} / {ap['hard']:.3f} | "
              f"{metrics['landmarks']['mean_nme']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Should R-Net and O-Net run in int8 (AVX-512 VNNI / AMX)? Their speed and the WIDER AP, beside fp32 and bf16.

Issue 28 asks for int8 R-Net and O-Net as an option if it keeps WIDER AP within 0.005 of fp32
and runs faster. This measures the one int8 path torch has for CPUs today: post-training static
quantization through torchao's PT2E flow with the X86 inductor quantizer (int8 activations per
tensor, weights per channel, observers calibrated on real windows), compiled by inductor, which
lowers it to oneDNN's int8 convolutions. It needs torchao, which the project does not depend on:

    pip install torchao==0.18.0
    python benchmarks/int8_windows.py [--threads 1] [--calibration-images 32] [--sample N] [--no-ap]

Calibration windows are what the fp32 cascade hands R-Net and O-Net on WIDER *training* photos
(../shared/data/wider_face_train_small), so the validation photos the AP is taken on stay unseen.
The compiled graphs have a fixed batch of --chunk windows: a shorter last chunk is padded (the
padding's outputs dropped). Printed: the CPU and its flags; milliseconds per chunk of each net in
fp32 (the detector's prepacked oneDNN modules), bf16 (the same in bfloat16) and int8, one thread,
after warm-up, best of five; then WIDER AP (easy / medium / hard) of the whole cascade with each,
and how far each is from fp32's.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jobs.pipelines.evaluate import InProcessDetection, evaluation_image
from mtcnn import FaceDetector
from mtcnn.cpu import cpu_model, speed_flags
from mtcnn.evaluation import evaluate_wider, load_wider_ground_truth
from mtcnn.inference import WindowNet

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOAL = 0.005


class FixedChunkNet(torch.nn.Module):
    """A compiled net of fixed batch size behind WindowNet's interface: inputs padded to whole chunks."""

    def __init__(self, compiled, chunk: int) -> None:
        super().__init__()
        self.compiled, self.chunk = compiled, chunk

    def forward(self, pixels: torch.Tensor):
        count = len(pixels)
        padded = F.pad(pixels, (0, 0, 0, 0, 0, 0, 0, -count % self.chunk))
        outputs = [self.compiled(padded[i:i + self.chunk].contiguous(memory_format=torch.channels_last))
                   for i in range(0, len(padded), self.chunk)]
        scores, offsets, landmarks = (torch.cat(part)[:count] if part[0] is not None else None
                                      for part in zip(*outputs))
        return scores, offsets, landmarks


def calibration_windows(detector: FaceDetector, paths: list[str]) -> dict[str, torch.Tensor]:
    """Every window the fp32 cascade hands R-Net and O-Net on these photos."""
    seen = {"rnet": [], "onet": []}
    hooks = [detector._nets[name].register_forward_pre_hook(lambda _m, args, n=name: seen[n].append(args[0].clone()))
             for name in seen]
    for path in paths:
        detector.detect([evaluation_image(path)])
    for hook in hooks:
        hook.remove()
    # Made under inference mode: a plain copy lets export trace through them.
    return {name: torch.cat(parts).clone() for name, parts in seen.items()}


def int8_net(stage, windows: torch.Tensor, chunk: int) -> FixedChunkNet:
    """R-Net or O-Net quantized to int8 by PT2E, calibrated on windows, compiled by inductor."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    net = WindowNet(stage).eval().to(memory_format=torch.channels_last)
    example = windows[:chunk].contiguous(memory_format=torch.channels_last)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    observed = prepare_pt2e(torch.export.export(net, (example,)).module(), quantizer)
    for start in range(0, len(windows) - chunk + 1, chunk):
        observed(windows[start:start + chunk].contiguous(memory_format=torch.channels_last))
    compiled = torch.compile(convert_pt2e(observed))
    with torch.no_grad():
        compiled(example)
    return FixedChunkNet(compiled, chunk)


def chunk_milliseconds(net, windows: torch.Tensor, repeats: int = 20) -> float:
    """Best-of-five mean milliseconds of one chunk through net."""
    windows = windows.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        net(windows)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                net(windows)
            best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timings and the AP runs")
    parser.add_argument("--chunk", type=int, default=64, help="windows per forward pass (the detector's CPU default)")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--sample", type=int, default=None, help="N validation images spread evenly over the set")
    parser.add_argument("--no-ap", action="store_true", help="timings only")
    args = parser.parse_args()
    try:
        import torchao  # noqa: F401
    except ImportError:
        sys.exit("int8_windows.py needs torchao: pip install torchao==0.18.0")
    warnings.filterwarnings("ignore")
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights folded into the graph: oneDNN's prepacked int8 kernels
    torch.set_num_threads(args.threads)
    flags = ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in speed_flags().items())
    print(f"CPU {cpu_model()}; flags: {flags}\ntorch {torch.__version__}, {args.threads} thread(s), "
          f"chunks of {args.chunk} windows", flush=True)

    detectors = {precision: FaceDetector(precision=precision) for precision in ("fp32", "bf16")}
    train = DATA / "wider_face_train_small" / "images"
    photos = sorted(str(p) for p in train.rglob("*.jpg"))
    photos = [photos[i] for i in np.linspace(0, len(photos) - 1, args.calibration_images).round().astype(int)]
    windows = calibration_windows(detectors["fp32"], photos)
    print("calibration: " + ", ".join(f"{len(w)} {name} windows" for name, w in windows.items())
          + f" from {len(photos)} WIDER training photos", flush=True)
    int8 = {}
    for name in ("rnet", "onet"):
        started = time.perf_counter()
        int8[name] = int8_net(detectors["fp32"].weights.stages[name], windows[name], args.chunk)
        print(f"  {name}: quantized and compiled in {time.perf_counter() - started:.0f} s", flush=True)

    print(f"\n| net | fp32 ms / {args.chunk} windows | bf16 | int8 | int8 / fp32 speed | bf16 / fp32 speed |\n"
          "|---|---|---|---|---|---|")
    for name in ("rnet", "onet"):
        chunk = windows[name][:args.chunk]
        fp32 = chunk_milliseconds(detectors["fp32"]._nets[name], chunk)
        bf16 = chunk_milliseconds(detectors["bf16"]._nets[name], chunk)
        quantized = chunk_milliseconds(int8[name], chunk)
        print(f"| {name} | {fp32:.2f} | {bf16:.2f} | {quantized:.2f} | {fp32 / quantized:.2f}x | {fp32 / bf16:.2f}x |",
              flush=True)
    if args.no_ap:
        return

    detectors["int8"] = FaceDetector()
    # The detector holds its nets in a private table; swapping two of them is this benchmark's only way in.
    detectors["int8"]._nets.update(int8)
    truth = load_wider_ground_truth(DATA / "wider_face_val_dev")
    if args.sample and args.sample < len(truth.images):
        picks = np.linspace(0, len(truth.images) - 1, args.sample).round().astype(int)
        truth = truth.subset([truth.images[i] for i in picks])
    paths = [truth.image_path(name) for name in truth.images]
    results = {}
    for precision, detector in detectors.items():
        started = time.perf_counter()
        found = InProcessDetection(detector, batch_size=1, progress_interval=60)(paths, precision)
        results[precision] = evaluate_wider({n: (d.boxes, d.scores) for n, d in zip(truth.images, found)}, truth).ap
        print(f"  {precision}: {time.perf_counter() - started:.0f} s", flush=True)
    settings = list(results["fp32"])
    print(f"\n{len(paths)} WIDER validation images\n| precision | " + " | ".join(settings)
          + " | max |AP - fp32| |\n|" + "---|" * (len(settings) + 2))
    for precision, ap in results.items():
        worst = max(abs(ap[s] - results["fp32"][s]) for s in settings)
        verdict = "" if precision == "fp32" else (" within" if worst <= GOAL else " OVER")
        print(f"| {precision} | " + " | ".join(f"{ap[s]:.4f}" for s in settings) + f" | {worst:.4f}{verdict} |")


if __name__ == "__main__":
    main()

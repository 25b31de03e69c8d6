"""Quick speed check (not a test): cnnvis occlusion vs Captum ``Occlusion`` on 64 MNIST-sized images.

    PYTHONPATH=. python benchmarks/vis_occlusion_quick.py [--reps 2] [--ppe 8 16 32]

mnist_cnn with random weights (timing does not depend on training), 64 images 1x28x28,
window 4x4, stride 1 (625 positions, 40 000 forward images). Captum is timed at each
``perturbations_per_eval`` given and its best time is used. Runs are interleaved and the minimum
over repetitions is reported, because other processes may share the CPU.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from captum.attr import Occlusion

from cnnvis.models import build_model
from cnnvis.vis.occlusion import occlusion_maps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--ppe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[0], help="cnnvis batch sizes (0 = default)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = build_model("mnist_cnn", 10).eval()
    images = torch.randn(64, 1, 28, 28)
    targets = model(images).argmax(1)
    runs: dict[str, list[float]] = {}

    def timed(key: str, fn) -> torch.Tensor:
        start = time.perf_counter()
        out = fn()
        runs.setdefault(key, []).append(time.perf_counter() - start)
        return out

    ours = theirs = None
    for _ in range(args.reps):
        for ppe in args.ppe:
            theirs = timed(f"captum ppe={ppe}", lambda: Occlusion(model).attribute(
                images, sliding_window_shapes=(1, 4, 4), strides=1, target=targets, perturbations_per_eval=ppe))
        for b in args.batch:
            for opt in (True, False):
                ours = timed(f"cnnvis batch={b or 'default'} optimize={opt}", lambda: occlusion_maps(
                    model, images, targets, window=4, stride=1, score="logit", batch_size=b or None,
                    optimize=opt).heatmap)
    print(f"threads={torch.get_num_threads()}  max |cnnvis - captum| = {(ours - theirs[:, 0]).abs().max():.2e}")
    for key, times in runs.items():
        print(f"{key:40s} min {min(times):7.2f} s   all {' '.join(f'{t:.2f}' for t in times)}")
    best_captum = min(min(t) for k, t in runs.items() if k.startswith("captum"))
    for key, times in runs.items():
        if key.startswith("cnnvis"):
            print(f"speed-up {key}: {best_captum / min(times):.2f}x vs best Captum ({best_captum:.2f} s)")


if __name__ == "__main__":
    main()

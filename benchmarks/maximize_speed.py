"""Feature-visualisation speed: cnnvis ``maximize`` vs lucent's ``render_vis``, the same recipe.

    python benchmarks/maximize_speed.py                      # resnet_small, 96 px, 5 classes, 128 steps
    python benchmarks/maximize_speed.py --steps 32 --reps 1  # quick
    python benchmarks/maximize_speed.py --checkpoint /path/to/run --size 96

Both sides render one image per class (a batch) of ``resnet_small`` (random weights unless
``--checkpoint``; timing does not depend on training): decorrelated Fourier image (sd 0.01, decay 1),
Adam at lr 0.05, lucent's ``standard_transforms`` (pad 12, jitter, scale, rotate, jitter) resp. our
single affine warp with pad 1/16 of the side, then ImageNet normalisation, the objective each class's
logit, ``--steps`` steps. lucent would upsample anything under 224 px to 224 px; it is given
``fixed_image_size`` = our canvas (size + 2 x pad) so both feed the model images of the same size.
No display, no saving, no progress bar. Both run with the same thread count (``--threads``), are
warmed up (lucent's first call also imports ``torch._dynamo`` through ``torch.optim``), then
alternate within every repetition; the table shows the minimum and median seconds per render.
Information only: the mean softmax probability of its class each side's images reach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cnnvis.models import build_model  # noqa: E402
from cnnvis.vis import maximize  # noqa: E402
from cnnvis.vis.robustness import Transforms  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what lucent's normalize() applies


def load_model(checkpoint: str | None, classes: int) -> tuple[torch.nn.Module, int]:
    if checkpoint:
        from cnnvis.run import load_run

        run = load_run(checkpoint, device=torch.device("cpu"))
        return run.model.eval(), run.spec.num_classes
    torch.manual_seed(0)
    return build_model("resnet_small", classes, 3).eval(), classes


def ours(model: torch.nn.Module, classes: int, size: int, steps: int) -> torch.Tensor:
    return maximize(model, list(range(classes)), (3, size, size), param="fourier", steps=steps, mean=MEAN, std=STD)


def theirs(model: torch.nn.Module, classes: int, size: int, steps: int) -> torch.Tensor:
    from lucent.optvis import objectives, param, render

    objective = sum(objectives.channel("labels", c, batch=c) for c in range(classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = render.render_vis(model, objective, lambda: param.image(size, batch=classes, sd=0.01), thresholds=(steps,),
                                   progress=False, show_image=False, fixed_image_size=size + 2 * Transforms.standard(size, size).pad)
    pixels = torch.as_tensor(images[-1]).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def class_probability(model: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        probs = torch.softmax(model(images), dim=1)
    return float(probs.diagonal().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help="a run directory or checkpoint (default: random weights)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, classes = load_model(args.checkpoint, args.classes)
    sides = {"cnnvis maximize (fourier)": ours, "lucent render_vis": theirs}
    for fn in sides.values():  # warm-up: imports, allocator, first-call costs
        fn(model, classes, args.size, 2)
    times: dict[str, list[float]] = {name: [] for name in sides}
    made: dict[str, torch.Tensor] = {}
    for rep in range(args.reps):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            started = time.perf_counter()
            made[name] = sides[name](model, classes, args.size, args.steps)
            times[name].append(time.perf_counter() - started)
    print(f"{classes} images of {args.size} px, {args.steps} steps, resnet_small, {torch.get_num_threads()} thread(s), "
          f"{args.reps} repetition(s)")
    print(f"{'':28} {'min s':>8} {'median s':>9} {'class prob':>11}")
    for name in sides:
        print(f"{name:28} {min(times[name]):8.2f} {statistics.median(times[name]):9.2f} "
              f"{class_probability(model, made[name]):11.3f}")
    ratio = min(times["lucent render_vis"]) / min(times["cnnvis maximize (fourier)"])
    print(f"maximize speed-up vs lucent render_vis: {ratio:.2f}x (target >= 1x: {'met' if ratio >= 1 else 'missed'})")


if __name__ == "__main__":
    main()

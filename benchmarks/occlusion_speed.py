"""Occlusion speed: cnnvis's incremental occlusion vs Captum ``Occlusion`` (and vs our own full forwards).

    python benchmarks/occlusion_speed.py --threads 1                  # both cases, CPU
    python benchmarks/occlusion_speed.py --only mnist --reps 5
    python benchmarks/occlusion_speed.py --device cuda                 # where a GPU is at hand

Cases (logit drop, all-channel square window, zero baseline, predicted class):

* ``resnet18``: torchvision ResNet-18, random weights (seed 0; BatchNorm statistics randomised so
  eval differs from train), one random 3x224x224 image, 16x16 window, stride 8 (27 x 27 = 729
  positions). Target: >= 5x Captum's best ``perturbations_per_eval``.
* ``mnist``: ``mnist_cnn`` (random weights, seed 0), the first 64 MNIST test digits (random
  inputs if the files are missing), 4x4 window, stride 1 (625 positions), as in
  ``benchmarks/vis_speed.py``. Target: >= 3x.

Before anything is timed, every side's heatmap is checked against Captum's
(``torch.testing.assert_close``, rtol 1e-4, atol 1e-4 of the largest |value|). Then the sides
alternate within each of ``--reps`` repetitions (A B C, then C B A, ...) and the minimum per call
counts. Captum's ``perturbations_per_eval`` settings are each timed once in the warm-up and the
``--keep`` fastest go on to the repetitions; its fastest counts.

Information rows, not in the ratio: our full batched forwards (``incremental=False``: today's fused
copy), and the approximate mode (``approximate=tau``, Krypton's projective-field threshold) at each
``--tau``, with its error against the exact maps: the largest absolute difference of the heatmap
(relative to the exact heatmap's largest |value|) and the SSIM of the two heatmaps (Wang et al.
2004: 7x7 Gaussian window, sigma 1.5, data range of the exact map). The theoretical saving, the
ratio of multiply-adds of a full forward to those the incremental plan runs per occluded copy, is
printed for each case.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on a shared machine

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis.models import build_model
from cnnvis.vis import occlusion_maps
from cnnvis.vis.incremental import IncrementalOcclusion

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class Side:
    label: str
    fn: Callable[[], torch.Tensor]  # -> heatmap [N, H, W]
    info: bool = False  # timed alongside, not in the ratio
    times: list[float] = field(default_factory=list)


@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor
    window: int
    stride: int
    target: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(side: Side, device: torch.device) -> torch.Tensor:
    sync(device)
    start = time.perf_counter()
    out = side.fn()
    sync(device)
    side.times.append(time.perf_counter() - start)
    return out


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    """Mean SSIM of two [N, H, W] maps (Wang, Bovik, Sheikh & Simoncelli 2004, eq. 13)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    g = torch.exp(-((torch.arange(7, dtype=torch.float64) - 3) ** 2) / (2 * 1.5**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    a, b = a.double()[:, None], b.double()[:, None]
    mu_a, mu_b = F.conv2d(a, kernel), F.conv2d(b, kernel)
    var_a = F.conv2d(a * a, kernel) - mu_a**2
    var_b = F.conv2d(b * b, kernel) - mu_b**2
    cov = F.conv2d(a * b, kernel) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = max(1.0, float(theirs.abs().max()))
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-4 * scale)


def load_mnist(n: int, data_root: Path, device: torch.device) -> tuple[torch.Tensor, str]:
    try:
        from cnnvis.data.mnist import load_mnist_tensors

        images, _ = load_mnist_tensors(data_root, download=False)["test"]
        x, what = images[:n].float().div(255).unsqueeze(1), f"the first {n} MNIST test digits"
    except Exception as exc:  # noqa: BLE001 -- any failure: fall back, and say so
        print(f"NOTE: MNIST not readable under {data_root} ({type(exc).__name__}); using random inputs")
        x, what = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)), f"{n} random digits"
    return ((x - MNIST_MEAN) / MNIST_STD).to(device), what


def build_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    from torchvision.models import resnet18

    cases = []
    if "resnet18" in args.only:
        torch.manual_seed(0)
        model = resnet18(num_classes=1000)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        cases.append(Case("resnet18 224 px, 16x16 window, stride 8", model.to(device).eval(), x.to(device), 16, 8, 5.0))
    if "mnist" in args.only:
        torch.manual_seed(0)
        x, what = load_mnist(args.images, args.data_root, device)
        print(f"mnist inputs: {what}")
        cases.append(Case(f"mnist_cnn {args.images} digits, 4x4 window, stride 1", build_model("mnist_cnn", 10).to(device).eval(),
                          x, 4, 1, 3.0))
    return cases


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import captum.attr as ca

    model, x, k, s = case.model, case.x, case.window, case.stride
    c = x.shape[1]

    def predicted() -> torch.Tensor:  # what a Captum user writes to explain the predicted class
        with torch.no_grad():
            return model(x).argmax(dim=1)

    def ours(**kw: Any) -> Callable[[], torch.Tensor]:
        return lambda: occlusion_maps(model, x, "pred", window=k, stride=s, score="logit", **kw).heatmap

    def captum(ppe: int) -> Callable[[], torch.Tensor]:
        return lambda: ca.Occlusion(model).attribute(x, sliding_window_shapes=(c, k, k), strides=(c, s, s),
                                                     baselines=0.0, target=predicted(),
                                                     perturbations_per_eval=ppe)[:, 0]

    with torch.no_grad():
        engine = IncrementalOcclusion(model, x, torch.zeros_like(x), (k, k), (s, s))
    found = occlusion_maps(model, x, "pred", window=k, stride=s, score="logit")
    print(f"\n== {case.name}: {found.score.numel()} occluded copies; {found.computation}")
    print(f"   multiply-adds per occluded copy: full {engine.macs[1] / 1e6:.1f} M, incremental plan "
          f"{engine.macs[0] / 1e6:.1f} M -> theoretical saving {engine.macs[1] / engine.macs[0]:.2f}x")
    del engine
    exact_side = Side("cnnvis occlusion (incremental, exact)", ours())
    exact = timed(exact_side, device)
    sweep = []
    for ppe in args.ppe:
        side = Side(f"captum Occlusion ppe={ppe}", captum(ppe))
        close(exact, timed(side, device))
        sweep.append(side)
        print(f"   warm-up {side.label}: {side.times[-1]:.2f} s (output agrees)", flush=True)
    theirs = sorted(sweep, key=lambda sd: sd.times[0])[: args.keep]
    extras = [Side("(info) cnnvis occlusion(incremental=False)", ours(incremental=False), info=True)]
    close(timed(extras[0], device), exact)
    approx: dict[float, tuple[float, float]] = {}
    span = float(exact.max() - exact.min())
    for tau in args.tau:
        side = Side(f"(info) cnnvis occlusion(approximate={tau:g})", ours(approximate=tau), info=True)
        rough = timed(side, device)
        approx[tau] = (float((rough - exact).abs().max()) / float(exact.abs().max()), ssim(rough, exact, span))
        extras.append(side)
    sides = [exact_side, *theirs, *extras]
    for side in sides:
        side.times.clear()
    for rep in range(args.reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            timed(side, device)
        print(f"   rep {rep + 1}/{args.reps}: " + ", ".join(f"{sd.times[-1]:.2f}" for sd in sides) + " s", flush=True)
    for side in sides:
        print(f"   {side.label:<46} min {min(side.times):8.3f} s  median {statistics.median(side.times):8.3f} s")
    fastest = min(theirs, key=lambda sd: min(sd.times))
    ratio = min(fastest.times) / min(exact_side.times)
    print(f"   incremental vs full forwards (ours): {min(extras[0].times) / min(exact_side.times):.2f}x")
    for tau, (err, sim) in approx.items():
        side = next(sd for sd in extras if f"={tau:g})" in sd.label)
        print(f"   approximate tau={tau:g}: {min(fastest.times) / min(side.times):.2f}x Captum's best, "
              f"max |diff| {err:.3g} of the exact map's max |value|, SSIM {sim:.4f}")
    print(f"   {case.name}: {ratio:.2f}x Captum's best ({fastest.label}); target >= {case.target:.0f}x: "
          f"{'met' if ratio >= case.target else 'MISSED'}", flush=True)
    return {"case": case.name, "ratio": ratio, "target": case.target, "reference": fastest.label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both sides (default: torch's)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", type=int, default=2, help="Captum settings (fastest in the warm-up) timed in the reps")
    parser.add_argument("--ppe", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--tau", type=float, nargs="*", default=[0.5], help="approximate-mode thresholds to time")
    parser.add_argument("--only", nargs="+", default=["resnet18", "mnist"], choices=["resnet18", "mnist"])
    parser.add_argument("--images", type=int, default=64, help="MNIST digits in the mnist case")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import captum

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, captum {captum.__version__}; device {name}; "
          f"torch.get_num_threads() = {torch.get_num_threads()} (both sides); OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}; reps {args.reps} interleaved, min counts")
    rows = [run_case(case, args, device) for case in build_cases(args, device)]
    print()
    for row in rows:
        print(f"{row['case']:<44} {row['ratio']:6.2f}x  target >= {row['target']:.0f}x  "
              f"{'met' if row['ratio'] >= row['target'] else 'MISSED'}  ({row['reference']})")


if __name__ == "__main__":
    main()

"""Visualisation speed: cnnvis vs Captum and pytorch-grad-cam on the same model and inputs.

    python benchmarks/vis_speed.py                       # CPU, torch's default thread count
    python benchmarks/vis_speed.py --threads 1 --reps 5
    python benchmarks/vis_speed.py --device cuda --checkpoint runs/mnist-20261123-101500

Model: ``mnist_cnn`` from ``cnnvis.models.build_model`` (random weights unless ``--checkpoint``
gives a run directory or checkpoint file; timing does not depend on training). Inputs: the first
64 MNIST test digits, normalised with mean 0.1307 / std 0.3081 (random inputs, with a note, if the
files are missing). Targets: the predicted class; each side computes it itself, inside the timing.

Pairs (ours vs theirs, target speed-up ours/theirs):

* occlusion 4x4 window, stride 1, logit drop vs Captum ``Occlusion`` at each ``--ppe``
  (perturbations_per_eval) -- Captum's fastest setting counts.  Target >= 1.5x (CPU), >= 3x (GPU).
* Grad-CAM / Grad-CAM++ on the last conv stage (``features.13``) vs pytorch-grad-cam ``GradCAM`` /
  ``GradCAMPlusPlus``; both sides return min-max normalised maps at input resolution.  Target >= 1.2x.
* integrated gradients, 50 Gauss-Legendre steps, zero baseline, vs Captum ``IntegratedGradients``
  at each ``--ibs`` (internal_batch_size; 0 = None) -- Captum's fastest counts.  Target >= 1.2x.
* saliency / guided backprop vs Captum ``Saliency(abs=True)`` / ``GuidedBackprop``.  Target >= 1.2x.
* deconvnet / input x gradient vs Captum ``Deconvolution`` / ``InputXGradient``.  Target: no slower (1.0x).
* smoothgrad (|gradient|), smoothgrad-sq, vargrad over the input gradient, 25 noisy copies each, vs
  Captum ``NoiseTunnel(Saliency)`` at each ``--ntb`` (nt_samples_batch_size; 0 = None), its fastest
  counting.  Target: no slower (1.0x). Captum draws its own noise in the timed calls; the agreement
  check runs it once more with our seeded noise in place of its draw (as tests/vis/test_parity_gradients.py).

Before a pair is timed its outputs are compared with ``torch.testing.assert_close`` after the same
normalisation as ``tests/vis/test_parity.py`` (raw attributions where the reference returns them
raw; pytorch-grad-cam's own ``scale_cam_image`` pipeline applied to our layer-resolution map).

Measurement: both sides run with the same thread count (printed; ``--threads`` sets it), are warmed
up, and then alternate within every repetition (A B, then B A, ...). Where the reference has several
settings, each one's warm-up call is timed and the ``--keep`` fastest go on to the repetitions. A fast call is repeated
``number`` times inside one measurement (the same number for both sides) so one measurement lasts at
least ``--min-time`` seconds; the table shows the minimum per call over ``--reps`` repetitions (the
median too). On CUDA the device is synchronised before every clock reading, and TF32 is off for both
sides unless ``--tf32`` (then the agreement checks use a loose tolerance). Two information-only
occlusion rows show where the speed-up comes from: ours without the conv-BN-fused model copy our CPU
path makes, and Captum given that same fused copy (``--no-extras`` skips them). The last line is the
occlusion headline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cnnvis.models import build_model  # noqa: E402
from cnnvis.vis import (  # noqa: E402
    deconvnet,
    default_layer,
    gradcam,
    gradcampp,
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    noise_tunnel,
    normalize_maps,
    occlusion,
    saliency,
)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# --------------------------------------------------------------------------- setup
#: every method must beat its reference by this much (the occlusion pair has its own, higher target)
MIN_RATIO = 1.2
#: the gradient family's methods added later must be no slower than their reference
NO_SLOWER = 1.0
NT_SAMPLES, NT_NOISE = 25, 0.15

def load_inputs(n: int, data_root: Path, device: torch.device) -> tuple[torch.Tensor, str]:
    try:
        from cnnvis.data.mnist import load_mnist_tensors

        images, _ = load_mnist_tensors(data_root, download=False)["test"]
        x = images[:n].float().div(255).unsqueeze(1)
        what = f"the first {n} MNIST test digits from {data_root / 'MNIST' / 'raw'}"
    except Exception as exc:  # noqa: BLE001 -- any failure: fall back, and say so
        print(f"NOTE: MNIST not readable under {data_root} ({type(exc).__name__}: {exc}); using random inputs")
        x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        what = f"{n} random 1x28x28 images (MNIST missing)"
    return ((x - MNIST_MEAN) / MNIST_STD).to(device), what


def load_model(checkpoint: str | None, device: torch.device) -> tuple[nn.Module, str]:
    if checkpoint is None:
        torch.manual_seed(0)
        return build_model("mnist_cnn", 10).to(device).eval(), "mnist_cnn, random weights (seed 0)"
    from cnnvis.run import load_run

    run = load_run(checkpoint, device)
    if run.config.model.arch != "mnist_cnn" or run.spec.in_channels != 1 or run.spec.image_size != 28:
        sys.exit(f"--checkpoint {checkpoint}: a {run.config.model.arch} model; this benchmark needs mnist_cnn")
    return run.model.eval(), f"mnist_cnn from {run.checkpoint} (epoch {run.epoch})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def close(ours: torch.Tensor, theirs: Any, rtol: float, atol: float) -> None:
    """tests/vis/test_parity.py's comparison: atol relative to the reference's largest value."""
    theirs = torch.as_tensor(theirs, dtype=ours.dtype, device=ours.device).detach()
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol * max(1.0, float(theirs.abs().max())))


# --------------------------------------------------------------------------- measurement
@dataclass
class Side:
    label: str
    fn: Callable[[], Any]
    param: Any = None  # the reference's setting (ppe, internal_batch_size)
    times: list[float] = field(default_factory=list)  # seconds per call, one per repetition


@dataclass
class Pair:
    method: str
    ours: Side
    theirs: list[Side]  # candidate settings of the reference; its fastest counts
    check: Callable[[Any, Any], None]  # check(our output, their output); raises if they disagree
    target: float
    number: int = 1
    #: extras(fastest reference setting) -> sides timed alongside for information only (not in the ratio)
    extras: Callable[[Side], list[Side]] | None = None
    extra_sides: list[Side] = field(default_factory=list)
    #: called once the pair is measured (removes the reference's hooks so later pairs run without them)
    cleanup: Callable[[], None] | None = None


def measure(side: Side, number: int, device: torch.device) -> Any:
    sync(device)
    start = time.perf_counter()
    for _ in range(number):
        out = side.fn()
    sync(device)
    side.times.append((time.perf_counter() - start) / number)
    return out


def best(side: Side) -> float:
    return min(side.times)


def run_pair(pair: Pair, args: argparse.Namespace, device: torch.device) -> None:
    # Warm-up, which is also the agreement check: every setting of theirs against our output. The
    # warm-up call of each of their settings is timed once and only the --keep fastest settings go
    # on to the timed repetitions (Captum's ppe=1 or 256 sweeps take minutes on a small CPU).
    ours_out = pair.ours.fn()
    sweep = []
    for side in pair.theirs:
        sync(device)
        start = time.perf_counter()
        theirs_out = side.fn()
        sync(device)
        sweep.append((time.perf_counter() - start, side))
        pair.check(ours_out, theirs_out)
    print(f"  {pair.method}: outputs agree ({len(pair.theirs)} reference setting(s) checked)", flush=True)
    if len(sweep) > 1:
        print("    warm-up sweep: " + ", ".join(f"{s.label.split()[-1]} {t:.2f} s" for t, s in sweep), flush=True)
        pair.theirs = [s for _, s in sorted(sweep, key=lambda ts: ts[0])[: args.keep]]
    if pair.extras is not None and not args.no_extras:
        pair.extra_sides = pair.extras(pair.theirs[0])
        for side in pair.extra_sides:
            pair.check(ours_out, side.fn())
    sync(device)
    start = time.perf_counter()
    pair.ours.fn()
    sync(device)
    one = time.perf_counter() - start
    pair.number = 1 if one >= args.min_time else max(1, min(1000, int(args.min_time / max(one, 1e-6)) + 1))
    sides = [pair.ours, *pair.theirs, *pair.extra_sides]
    for rep in range(args.reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:  # alternate the order
            measure(side, pair.number, device)
        print(f"    rep {rep + 1}/{args.reps}: " + ", ".join(f"{s.times[-1]:.4f}" for s in sides) + " s", flush=True)
    for side in sides:
        print(f"    {side.label:<50} min {best(side):9.4f} s  median {statistics.median(side.times):9.4f} s  "
              f"({pair.number} call(s) per measurement)", flush=True)


# --------------------------------------------------------------------------- the pairs
def occlusion_extras(model: nn.Module, x: torch.Tensor, ppe: int, predicted: Callable[[], torch.Tensor]) -> list[Side]:
    """Where the occlusion speed-up comes from: ours without the fused model copy, and Captum at its
    fastest ppe given the fused copy our CPU path uses (``optimize_for_inference``; CPU only)."""
    import captum.attr as ca

    sides = [Side("(info) cnnvis occlusion(optimize=False)",  # [N, 1, H, W] like Captum's, for the check
                  lambda: occlusion(model, x, "pred", window=4, stride=1, score="logit", optimize=False)[:, None])]
    if x.device.type == "cpu":
        from torch.fx.experimental.optimization import optimize_for_inference

        fused = optimize_for_inference(model)
        sides.append(Side(f"(info) captum Occlusion ppe={ppe} on the fused copy", lambda: ca.Occlusion(fused).attribute(
            x, sliding_window_shapes=(1, 4, 4), strides=1, baselines=0.0, target=predicted(),
            perturbations_per_eval=ppe)))
    return sides


def build_pairs(model: nn.Module, x: torch.Tensor, args: argparse.Namespace, device: torch.device) -> list[Pair]:
    import captum.attr as ca
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.image import scale_cam_image

    gpu = device.type == "cuda"
    loose = args.tf32 and gpu
    tol = (lambda r, a: (1e-2, 1e-2)) if loose else (lambda r, a: (r, a))  # noqa: E731
    layer_name = default_layer(model, x)
    layer = model.get_submodule(layer_name)
    h, w = x.shape[-2:]

    def predicted() -> torch.Tensor:  # what a Captum user writes to explain the predicted class
        with torch.no_grad():
            return model(x).argmax(dim=1)

    pairs: list[Pair] = []

    # (a) occlusion: logit drop, 4x4 all-channel window, stride 1, zero baseline
    def occl_check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        close(ours, theirs[:, 0], *tol(1e-4, 1e-5))

    pairs.append(Pair(
        "occlusion 4x4 stride 1",
        Side("cnnvis occlusion(score='logit')", lambda: occlusion(model, x, "pred", window=4, stride=1, score="logit")),
        [Side(f"captum Occlusion ppe={ppe}", lambda ppe=ppe: ca.Occlusion(model).attribute(
            x, sliding_window_shapes=(1, 4, 4), strides=1, baselines=0.0, target=predicted(),
            perturbations_per_eval=ppe), ppe) for ppe in args.ppe],
        occl_check, 3.0 if gpu else 1.5,
        extras=lambda fastest: occlusion_extras(model, x, fastest.param, predicted),
    ))

    # (b) Grad-CAM, Grad-CAM++: pytorch-grad-cam returns ReLU'd, min-max normalised maps at input size
    for name, ours_fn, theirs_cls in (("Grad-CAM", gradcam, pgc.GradCAM), ("Grad-CAM++", gradcampp, pgc.GradCAMPlusPlus)):
        # Built once at first use, as in their README; its hooks store the layer's activations on
        # every forward pass until released, so it must not exist while other pairs run.
        holder: dict[str, Any] = {}

        def their_cam(theirs_cls=theirs_cls, holder=holder) -> np.ndarray:
            if "cam" not in holder:
                holder["cam"] = theirs_cls(model=model, target_layers=[layer])
            return holder["cam"](input_tensor=x, targets=None)

        def release(holder=holder) -> None:
            if "cam" in holder:
                holder.pop("cam").activations_and_grads.release()

        def cam_check(ours: torch.Tensor, theirs: np.ndarray, ours_fn=ours_fn) -> None:
            # their pipeline (ReLU, min-max + cv2 resize, min-max) on our raw layer-resolution map
            raw = ours_fn(model, x, "pred", layer_name, relu=False, upsample=False).cpu().numpy()
            final = scale_cam_image(scale_cam_image(np.maximum(raw, 0), (w, h)))
            np.testing.assert_allclose(final, theirs, atol=1e-2 if loose else 1e-4)
            assert ours.shape == theirs.shape

        pairs.append(Pair(
            f"{name} ({layer_name})",
            Side(f"cnnvis {ours_fn.__name__} + normalize_maps",
                 lambda ours_fn=ours_fn: normalize_maps(ours_fn(model, x, "pred", layer_name), "minmax")),
            [Side(f"pytorch-grad-cam {theirs_cls.__name__}", their_cam)],
            cam_check, MIN_RATIO, cleanup=release,
        ))

    # (c) integrated gradients: 50 Gauss-Legendre steps from a zero baseline
    def ig_check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        raw = integrated_gradients(model, x, "pred", steps=50, reduce=None)
        close(raw, theirs, *tol(1e-4, 1e-5))
        close(ours, theirs.sum(dim=1), *tol(1e-4, 1e-5))

    ig = ca.IntegratedGradients(model)
    pairs.append(Pair(
        "integrated gradients 50 steps",
        Side("cnnvis integrated_gradients", lambda: integrated_gradients(model, x, "pred", steps=50)),
        [Side(f"captum IntegratedGradients ibs={ibs or None}", lambda ibs=ibs: ig.attribute(
            x, baselines=0.0, target=predicted(), n_steps=50, method="gausslegendre",
            internal_batch_size=ibs or None), ibs or None) for ibs in args.ibs],
        ig_check, MIN_RATIO,
    ))

    # (d) saliency (|gradient|) and guided backprop
    def sal_check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        close(ours, theirs.amax(dim=1), *tol(1e-4, 1e-6))

    sal = ca.Saliency(model)
    pairs.append(Pair(
        "saliency",
        Side("cnnvis saliency", lambda: saliency(model, x, "pred")),
        [Side("captum Saliency(abs=True)", lambda: sal.attribute(x, target=predicted(), abs=True))],
        sal_check, MIN_RATIO,
    ))

    def gb_check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        close(guided_backprop(model, x, "pred", reduce=None), theirs, *tol(1e-4, 1e-6))
        close(ours, theirs.abs().amax(dim=1), *tol(1e-4, 1e-6))

    gbp = ca.GuidedBackprop(model)
    pairs.append(Pair(
        "guided backprop",
        Side("cnnvis guided_backprop", lambda: guided_backprop(model, x, "pred")),
        [Side("captum GuidedBackprop", lambda: gbp.attribute(x, target=predicted()))],
        gb_check, MIN_RATIO,
    ))
    pairs += gradient_family_pairs(model, x, args, tol, predicted)
    return pairs


def gradient_family_pairs(model: nn.Module, x: torch.Tensor, args: argparse.Namespace,
                          tol: Callable[[float, float], tuple[float, float]],
                          predicted: Callable[[], torch.Tensor]) -> list[Pair]:
    """(e) deconvnet, input x gradient; (f) the noise tunnel over the input gradient."""
    import captum.attr as ca
    from captum.attr._core.noise_tunnel import NoiseTunnel

    pairs: list[Pair] = []

    def deconv_check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        close(deconvnet(model, x, "pred", reduce=None), theirs, *tol(1e-4, 1e-6))
        close(ours, theirs.abs().amax(dim=1), *tol(1e-4, 1e-6))

    dec = ca.Deconvolution(model)
    pairs.append(Pair(
        "deconvnet",
        Side("cnnvis deconvnet", lambda: deconvnet(model, x, "pred")),
        [Side("captum Deconvolution", lambda: dec.attribute(x, target=predicted()))],
        deconv_check, NO_SLOWER,
    ))

    def ixg_check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        close(ours, theirs, *tol(1e-4, 1e-6))

    ixg = ca.InputXGradient(model)
    pairs.append(Pair(
        "input x gradient",
        Side("cnnvis input_x_gradient(reduce=None)", lambda: input_x_gradient(model, x, "pred", reduce=None)),
        [Side("captum InputXGradient", lambda: ixg.attribute(x, target=predicted()))],
        ixg_check, NO_SLOWER,
    ))

    # our seeded noise, row i * samples + s (Captum's repeat_interleave order), for the agreement check
    flat = x.reshape(len(x), -1)
    sigma = (NT_NOISE * (flat.amax(dim=1) - flat.amin(dim=1))).view(-1, 1, 1, 1)
    gen = torch.Generator(device=x.device).manual_seed(0)
    eps = torch.randn((NT_SAMPLES, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
    drawn = (sigma[:, None] * eps[None]).reshape(-1, *x.shape[1:])
    nt = NoiseTunnel(ca.Saliency(model))
    for tunnel in ("smoothgrad", "smoothgrad-sq", "vargrad"):
        absolute = tunnel == "smoothgrad"  # smoothgrad's default |gradient| = Saliency(abs=True)

        def theirs(tunnel=tunnel, absolute=absolute, ntb: int | None = None) -> torch.Tensor:
            return nt.attribute(x, nt_type=tunnel.replace("-", "_"), nt_samples=NT_SAMPLES, stdevs=NT_NOISE,
                                nt_samples_batch_size=ntb, target=predicted(), abs=absolute)

        def nt_check(ours: torch.Tensor, _theirs: torch.Tensor, theirs=theirs) -> None:
            original = NoiseTunnel.__dict__["_add_noise_to_input"]  # the staticmethod itself
            NoiseTunnel._add_noise_to_input = staticmethod(lambda inp, stdev, k: inp.repeat_interleave(k, dim=0) + drawn)
            try:
                ref = theirs()
            finally:
                NoiseTunnel._add_noise_to_input = original
            close(ours, ref, *tol(1e-4, 1e-5))

        pairs.append(Pair(
            f"{tunnel} {NT_SAMPLES} samples",
            Side(f"cnnvis noise_tunnel({tunnel!r}, reduce=None)", lambda tunnel=tunnel, absolute=absolute: noise_tunnel(
                model, x, "pred", tunnel=tunnel, samples=NT_SAMPLES, noise=NT_NOISE, absolute=absolute, reduce=None)),
            [Side(f"captum NoiseTunnel(Saliency) ntb={ntb or None}", lambda ntb=ntb, theirs=theirs: theirs(ntb=ntb or None),
                  ntb or None) for ntb in args.ntb],
            nt_check, NO_SLOWER,
        ))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both sides (default: torch's)")
    parser.add_argument("--checkpoint", default=None, help="a trained mnist_cnn run directory or checkpoint file")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per side (interleaved)")
    parser.add_argument("--min-time", type=float, default=0.25, help="seconds one measurement lasts at least")
    parser.add_argument("--ppe", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256],
                        help="Captum Occlusion perturbations_per_eval values to try")
    parser.add_argument("--ibs", type=int, nargs="+", default=[0, 3200],
                        help="Captum IntegratedGradients internal_batch_size values to try (0 = None)")
    parser.add_argument("--ntb", type=int, nargs="+", default=[0, 5],
                        help="Captum NoiseTunnel nt_samples_batch_size values to try (0 = None)")
    parser.add_argument("--keep", type=int, default=2,
                        help="how many of the fastest reference settings (by the warm-up sweep) are timed")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the information-only occlusion rows (ours unfused, Captum on the fused copy)")
    parser.add_argument("--only", nargs="+", default=None, help="run only pairs whose name starts with one of these")
    parser.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 (looser agreement checks)")
    args = parser.parse_args()

    warnings.simplefilter("ignore")  # Captum's requires_grad / in-place ReLU notes, constant-map warnings
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model, model_what = load_model(args.checkpoint, device)
    x, inputs_what = load_inputs(args.images, args.data_root, device)

    from importlib.metadata import version

    import captum
    import pytorch_grad_cam  # noqa: F401

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, captum {captum.__version__}, grad-cam {version('grad-cam')}; "
          f"device {dev_name}; torch.get_num_threads() = {torch.get_num_threads()} (both sides)")
    print(f"model: {model_what}; inputs: {inputs_what}")
    print(f"reps {args.reps} (interleaved), min over reps reported\n")

    pairs = build_pairs(model, x, args, device)
    if args.only:
        pairs = [p for p in pairs if any(p.method.lower().startswith(o.lower()) for o in args.only)]
    for pair in pairs:
        run_pair(pair, args, device)
        if pair.cleanup is not None:
            pair.cleanup()

    rows = []
    for pair in pairs:
        fastest = min(pair.theirs, key=best)
        ratio = best(fastest) / best(pair.ours)
        rows.append((pair.method, best(pair.ours), best(fastest), ratio, pair.target, fastest.label))
    print(f"\n{'method':<32} {'ours s':>9} {'theirs s':>9} {'ratio':>7} {'target':>7}  met?  reference (fastest setting)")
    for method, ours_s, theirs_s, ratio, target, label in rows:
        print(f"{method:<32} {ours_s:>9.4f} {theirs_s:>9.4f} {ratio:>6.2f}x {target:>6.1f}x  "
              f"{'yes' if ratio >= target else 'NO ':<4}  {label}")
    for pair in pairs:
        for side in pair.extra_sides:
            print(f"  {side.label}: {best(side):.4f} s")
    occl = next((r for r in rows if r[0].startswith("occlusion")), None)
    if occl is not None:
        print(f"occlusion speed-up vs Captum's best ({occl[5]}): {occl[3]:.2f}x "
              f"(target >= {occl[4]:.1f}x: {'met' if occl[3] >= occl[4] else 'MISSED'})")


if __name__ == "__main__":
    main()

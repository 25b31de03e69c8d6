"""CAM-family speed: cnnvis vs pytorch-grad-cam on the same model, images and targets.

    python benchmarks/cam_speed.py --threads 1
    python benchmarks/cam_speed.py --mnist runs/mnist-... --flowers runs/flowers5-... --reps 3

Models: the digit net ``mnist_cnn`` and the photo net ``resnet_small`` -- from the given run
directories (their first ``--images`` fixed test images) or, without them, freshly built with
random weights on random images (28 px digits, 96 px photos; timing barely depends on training,
though the number of dead channels Score-CAM and Ablation-CAM can skip does). Layer: the default
(``hooks.default_layer``). Targets: each image's predicted class, given to both sides.

Every method runs on the whole batch. Before timing, each pair's outputs are compared after
pytorch-grad-cam's own pipeline (ReLU, ``scale_cam_image`` min-max + OpenCV resize) applied to
our layer-resolution map (Eigen-CAM: up to the principal component's sign; FullGrad: min-max of
our input-resolution map); a mismatch stops the benchmark. pytorch-grad-cam's Score-CAM and
Ablation-CAM run at each ``--batch-sizes`` value (their ``batch_size``); each setting's first call
is timed and the fastest goes on to the repetitions. Then both sides alternate ``--reps`` times;
the table shows the minimum seconds per call and theirs / ours. Targets: Score-CAM and
Ablation-CAM >= 1.5x; the other methods >= 1x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam draws a tqdm bar per image
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnnvis.models import build_model  # noqa: E402
from cnnvis.vis import (  # noqa: E402
    ablationcam,
    default_layer,
    eigencam,
    fullgrad,
    get_layer,
    hirescam,
    layercam,
    scorecam,
    xgradcam,
)

OURS: dict[str, Callable[..., torch.Tensor]] = {
    "xgradcam": xgradcam, "layercam": layercam, "hirescam": hirescam, "eigencam": eigencam,
    "fullgrad": fullgrad, "scorecam": scorecam, "ablationcam": ablationcam,
}
THEIRS = {"xgradcam": "XGradCAM", "layercam": "LayerCAM", "hirescam": "HiResCAM", "eigencam": "EigenCAM",
          "fullgrad": "FullGrad", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}
BATCHED = ("scorecam", "ablationcam")


def load(kind: str, run_dir: str | None, count: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    if run_dir:
        from cnnvis.commands.visualize import dataset_images
        from cnnvis.run import load_run

        run = load_run(run_dir, device=torch.device("cpu"))
        return run.model.eval(), dataset_images(run, count=count).images, f"{run.architecture} ({Path(run_dir).name})"
    torch.manual_seed(0)
    if kind == "mnist":
        return build_model("mnist_cnn", 10, in_channels=1).eval(), torch.randn(count, 1, 28, 28), "mnist_cnn (random)"
    model = build_model("resnet_small", 5, in_channels=3).eval()
    return model, torch.randn(count, 3, 96, 96), "resnet_small (random)"


def their_pipeline(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from pytorch_grad_cam.utils.image import scale_cam_image

    return scale_cam_image(scale_cam_image(np.maximum(raw, 0), size))


def check(name: str, ours: torch.Tensor, theirs: np.ndarray, size: tuple[int, int]) -> None:
    from pytorch_grad_cam.utils.image import scale_cam_image

    raw = ours.numpy()
    if name == "fullgrad":
        mine = scale_cam_image(raw)
    elif name == "eigencam":  # the component's sign: ours is oriented, theirs is NumPy's
        candidates = [their_pipeline(raw, size), their_pipeline(-raw, size)]
        mine = np.stack([min(candidates, key=lambda c: np.abs(c[i] - theirs[i]).max())[i] for i in range(len(raw))])
    else:
        mine = their_pipeline(raw, size)
    np.testing.assert_allclose(mine, theirs, atol=2e-4, err_msg=f"{name}: cnnvis and pytorch-grad-cam disagree")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(model: torch.nn.Module, images: torch.Tensor, methods: list[str], batch_sizes: list[int], reps: int
          ) -> list[tuple[str, float, float, str]]:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = default_layer(model, images)
    module = get_layer(model, layer)
    with torch.no_grad():
        t = model(images).argmax(dim=1)
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    size = (images.shape[-1], images.shape[-2])
    rows = []
    for name in methods:
        def ours() -> torch.Tensor:
            if name == "fullgrad":
                return OURS[name](model, images, t)
            return OURS[name](model, images, t, layer, relu=False, upsample=False)

        def theirs_with(bs: int | None) -> Callable[[], np.ndarray]:
            cls = getattr(pytorch_grad_cam, THEIRS[name])
            layers = [] if name == "fullgrad" else [module]

            def call() -> np.ndarray:
                kwargs = {"batch_size": bs} if name == "ablationcam" else {}
                with cls(model=model, target_layers=layers, **kwargs) as cam:
                    if name == "scorecam":
                        cam.batch_size = bs
                    return cam(input_tensor=images, targets=targets)
            return call

        settings = batch_sizes if name in BATCHED else [None]
        first = {bs: timed(theirs_with(bs)) for bs in settings}
        best = min(settings, key=lambda bs: first[bs][0])
        theirs = theirs_with(best)
        t_ours, out = timed(ours)
        check(name, out, first[best][1], size)
        mine, ref = [t_ours], [first[best][0]]
        for _ in range(reps):
            mine.append(timed(ours)[0])
            ref.append(timed(theirs)[0])
        note = f"their batch_size={best}" if best is not None else ""
        rows.append((name, min(mine), min(ref), note))
        print(f"  {name:12s} ours {min(mine):8.3f} s   theirs {min(ref):8.3f} s   x{min(ref) / min(mine):5.1f}  {note}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="an mnist_cnn run directory (default: random weights)")
    parser.add_argument("--flowers", help="a resnet_small run directory (default: random weights)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--methods", nargs="+", default=list(OURS), choices=list(OURS))
    parser.add_argument("--models", nargs="+", default=["mnist", "flowers"], choices=["mnist", "flowers"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.images} images, "
          f"min of {args.reps + 1} calls per side")
    table, headline = [], []
    for kind in args.models:
        model, images, label = load(kind, getattr(args, kind), args.images)
        print(f"{label}, layer {default_layer(model, images)}, images {tuple(images.shape)}")
        for name, ours, theirs, note in bench(model, images, args.methods, args.batch_sizes, args.reps):
            table.append(f"| {label} | {name} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.1f}x | {note} |")
            if name in BATCHED:
                headline.append(f"{name} {kind} {theirs / ours:.2f}x")
    print("\n| model | method | cnnvis s | pytorch-grad-cam s | speed-up | note |\n|---|---|---|---|---|---|")
    print("\n".join(table))
    if headline:
        print(f"speed-up vs pytorch-grad-cam's best batch_size (target >= 1.5x): {', '.join(headline)}")


if __name__ == "__main__":
    main()

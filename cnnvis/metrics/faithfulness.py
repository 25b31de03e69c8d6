"""Which map can I trust? Every heatmap method of :data:`cnnvis.vis.METHODS`, scored on the same
images and target classes by deletion / insertion (:mod:`cnnvis.metrics.perturbation`), ROAD
(:mod:`cnnvis.metrics.road`), max-sensitivity (:mod:`cnnvis.metrics.sensitivity`) and the
cascading randomization test (:mod:`cnnvis.metrics.randomization`), ranked (:func:`rank_rows`).

ROAD and max-sensitivity cost the most (a sparse solve per removed fraction, an explanation per
noisy copy), so they run on the first ``subset_images`` images only.

Maps are compared as the importance they rank: the raw heatmap, upsampled to the input size,
higher = more important (signed maps therefore rank positive evidence first). Everything is
batched and runs on the images' device; nothing here prints or writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnnvis.errors import ConfigError, UnsupportedModelError, VisError
from cnnvis.io import to_jsonable
from cnnvis.metrics.perturbation import (
    DEFAULT_STEPS,
    InsertionStart,
    auc,
    importance_order,
    insertion_start,
    perturbation_curves,
    random_order,
)
from cnnvis.metrics.randomization import (
    DEFAULT_CASCADE_POINTS,
    SANITY_THRESHOLD,
    SEED,
    CascadeStep,
    ExplainFn,
    RandomizationResult,
    randomization_checks,
)
from cnnvis.metrics.road import DEFAULT_FRACTIONS, NOISE, road_curves
from cnnvis.metrics.sensitivity import DEFAULT_RADIUS, max_sensitivity, perturbations
from cnnvis.vis.hooks import (
    Targets,
    check_images,
    default_layer,
    get_layer,
    model_state,
    resolve_targets,
)
from cnnvis.vis.maps import upsample
from cnnvis.vis.registry import METHODS, get_method, run_method

DEFAULT_IMAGES = 32
DEFAULT_SUBSET = 8  #: images ROAD and max-sensitivity run on
DEFAULT_SENSITIVITY_SAMPLES = 5  #: noisy copies per image (Captum's default is 10; each is one explanation)
NAN = float("nan")


def heatmap_methods() -> list[str]:
    """The registered methods whose result is a heatmap, in display order."""
    return [name for name, spec in METHODS.items() if spec.kind == "heatmap"]


def method_explainer(name: str, layer: str | None = None, **params: Any) -> ExplainFn:
    """An :data:`ExplainFn` for registry method ``name``: maps upsampled to the input size.

    ``layer`` only applies to layer-based methods (the others ignore it); stochastic methods get
    ``seed=SEED`` unless ``params`` say otherwise, so the trained and the randomised model see the
    same noise and only the weights differ.
    """
    spec = get_method(name)
    if spec.kind != "heatmap":
        raise ConfigError(f"{name} does not make a heatmap; faithfulness applies to: {', '.join(heatmap_methods())}")
    if "seed" in spec.defaults:
        params = {"seed": SEED, **params}
    use_layer = layer if spec.needs_layer else None

    def explain(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        maps = run_method(name, model, images, targets, use_layer, **params)
        return upsample(maps.detach().float(), tuple(images.shape[-2:]))

    return explain


@dataclass
class FaithfulnessRow:
    """One method's scores. ``rank`` 1 is the most trustworthy (see :func:`rank_rows`)."""

    method: str
    layer: str | None
    deletion_auc: float  #: mean over the images; lower is better
    insertion_auc: float  #: higher is better
    randomization: RandomizationResult
    deletion_curve: list[float]  #: mean target probability at each step
    insertion_curve: list[float]
    beats_random: bool  #: lower deletion and higher insertion AUC than the random pixel order
    seconds: float
    rank: int = 0
    road_morf: float = NAN  #: mean target probability, most relevant pixels removed; lower is better
    road_lerf: float = NAN  #: least relevant pixels removed; higher is better
    road_morf_curve: list[float] = field(default_factory=list)  #: mean probability at each removal fraction
    road_lerf_curve: list[float] = field(default_factory=list)
    sensitivity: float = NAN  #: mean max-sensitivity over the images; lower is better

    @property
    def road(self) -> float:
        """pytorch-grad-cam's ``ROADCombined``: (LeRF - MoRF) / 2; higher is better."""
        return (self.road_lerf - self.road_morf) / 2

    @property
    def passed(self) -> bool:
        return self.randomization.passed

    @property
    def margin(self) -> float:
        """Insertion minus deletion AUC: how much better the map's order is at both at once."""
        return self.insertion_auc - self.deletion_auc


@dataclass
class FaithfulnessReport:
    rows: list[FaithfulnessRow]
    random_deletion_auc: float
    random_insertion_auc: float
    random_deletion_curve: list[float]
    random_insertion_curve: list[float]
    images: int
    steps: int
    cascade_points: int
    threshold: float
    insertion_start: str
    baseline: float
    seed: int
    targets: list[int]
    road_fractions: list[float] = field(default_factory=list)  #: empty: ROAD not measured
    road_noise: float = NOISE
    subset_images: int = 0  #: images ROAD and max-sensitivity ran on
    sensitivity_samples: int = 0  #: 0: max-sensitivity not measured
    sensitivity_radius: float = DEFAULT_RADIUS
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (method, reason)
    info: dict[str, Any] = field(default_factory=dict)  #: checkpoint, images used, class names ...

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            rows.append({
                "rank": r.rank, "method": r.method, "layer": r.layer,
                "deletion_auc": r.deletion_auc, "insertion_auc": r.insertion_auc,
                "randomization_spearman": r.randomization.spearman, "randomization_ssim": r.randomization.ssim,
                "randomization_check": "pass" if r.passed else "fail", "beats_random": r.beats_random,
                "cascade": r.randomization.steps, "deletion_curve": r.deletion_curve,
                "insertion_curve": r.insertion_curve, "seconds": r.seconds,
                "road_morf": r.road_morf, "road_lerf": r.road_lerf, "road": r.road,
                "road_morf_curve": r.road_morf_curve, "road_lerf_curve": r.road_lerf_curve,
                "max_sensitivity": r.sensitivity,
            })
        return to_jsonable({
            "methods": rows,
            "random_order": {"deletion_auc": self.random_deletion_auc, "insertion_auc": self.random_insertion_auc,
                             "deletion_curve": self.random_deletion_curve, "insertion_curve": self.random_insertion_curve},
            "skipped": [{"method": m, "reason": why} for m, why in self.skipped],
            "parameters": {
                "images": self.images, "steps": self.steps, "cascade_points": self.cascade_points,
                "threshold": self.threshold, "insertion_start": self.insertion_start,
                "deletion_baseline": self.baseline, "seed": self.seed,
                "similarity": "mean |Spearman| (verdict) and SSIM between trained and fully randomised maps",
                "ranking": RANKING,
                "road_fractions": self.road_fractions, "road_noise": self.road_noise,
                "subset_images": self.subset_images, "sensitivity_samples": self.sensitivity_samples,
                "sensitivity_radius": self.sensitivity_radius,
            },
            "targets": self.targets,
            **self.info,
        })

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaithfulnessReport:
        """The report :meth:`to_dict` wrote (``faithfulness.json``); a missing field is a ``KeyError``."""
        params, random = data["parameters"], data["random_order"]
        threshold = float(params["threshold"])
        rows = [
            FaithfulnessRow(
                method=r["method"], layer=r.get("layer"),
                deletion_auc=_number(r["deletion_auc"]), insertion_auc=_number(r["insertion_auc"]),
                randomization=RandomizationResult(
                    [CascadeStep(c["layer"], int(c["layers_randomized"]), _number(c["spearman"]), _number(c["ssim"]))
                     for c in r["cascade"]], threshold),
                deletion_curve=[_number(v) for v in r["deletion_curve"]],
                insertion_curve=[_number(v) for v in r["insertion_curve"]],
                beats_random=bool(r["beats_random"]), seconds=_number(r["seconds"]), rank=int(r["rank"]),
                road_morf=_number(r.get("road_morf")), road_lerf=_number(r.get("road_lerf")),
                road_morf_curve=[_number(v) for v in r.get("road_morf_curve", [])],
                road_lerf_curve=[_number(v) for v in r.get("road_lerf_curve", [])],
                sensitivity=_number(r.get("max_sensitivity")),
            )
            for r in data["methods"]
        ]
        known = {"methods", "random_order", "skipped", "parameters", "targets"}
        return cls(
            rows=rows,
            random_deletion_auc=_number(random["deletion_auc"]), random_insertion_auc=_number(random["insertion_auc"]),
            random_deletion_curve=[_number(v) for v in random["deletion_curve"]],
            random_insertion_curve=[_number(v) for v in random["insertion_curve"]],
            images=int(params["images"]), steps=int(params["steps"]), cascade_points=int(params["cascade_points"]),
            threshold=threshold, insertion_start=params["insertion_start"], baseline=float(params["deletion_baseline"]),
            seed=int(params["seed"]), targets=list(data["targets"]),
            skipped=[(item["method"], item["reason"]) for item in data.get("skipped", [])],
            road_fractions=[float(v) for v in params.get("road_fractions", [])],
            road_noise=float(params.get("road_noise", NOISE)), subset_images=int(params.get("subset_images", 0)),
            sensitivity_samples=int(params.get("sensitivity_samples", 0)),
            sensitivity_radius=float(params.get("sensitivity_radius", DEFAULT_RADIUS)),
            info={k: v for k, v in data.items() if k not in known},
        )


def _number(value: Any) -> float:
    """A JSON number back to a float (``null``, a non-finite value written out, becomes NaN)."""
    return float("nan") if value is None else float(value)


RANKING = ("passing methods first, then the mean of each method's places by insertion minus deletion AUC and by "
           "ROAD (LeRF - MoRF) / 2 (both highest first; insertion minus deletion alone when ROAD was not measured), "
           "ties by insertion minus deletion; max-sensitivity is shown but does not rank")


def rank_rows(rows: Sequence[FaithfulnessRow]) -> list[FaithfulnessRow]:
    """Methods that pass the randomization test first (a map that ignores the weights is no
    explanation however well it deletes), then by the mean of their places on the two
    faithfulness scores, insertion - deletion AUC and ROAD: both ask whether the map's order of
    pixels is the model's, ROAD without deletion's tell-tale holes, so neither alone decides.

    Max-sensitivity does not rank: a map that ignores the input entirely is perfectly stable.
    """
    scores: list[Callable[[FaithfulnessRow], float]] = [lambda r: r.margin]
    if rows and all(r.road == r.road for r in rows):  # NaN: ROAD not measured
        scores.append(lambda r: r.road)
    place = {id(r): 0.0 for r in rows}
    for score in scores:
        for i, row in enumerate(sorted(rows, key=lambda r: -score(r))):
            place[id(row)] += i / len(scores)
    ranked = sorted(rows, key=lambda r: (not r.passed, place[id(r)], -r.margin))
    for i, row in enumerate(ranked, 1):
        row.rank = i
    return ranked


def faithfulness(
    model: nn.Module,
    images: Tensor,
    targets: Targets = "pred",
    *,
    methods: Sequence[str] | None = None,
    layer: str | None = None,
    steps: int = DEFAULT_STEPS,
    cascade_points: int = DEFAULT_CASCADE_POINTS,
    threshold: float = SANITY_THRESHOLD,
    start: InsertionStart = "baseline",
    baseline: float = 0.0,
    seed: int = SEED,
    batch_size: int | None = None,
    road_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    subset_images: int = DEFAULT_SUBSET,
    sensitivity_samples: int = DEFAULT_SENSITIVITY_SAMPLES,
    sensitivity_radius: float = DEFAULT_RADIUS,
    on_progress: Callable[[str], None] | None = None,
) -> FaithfulnessReport:
    """Deletion / insertion AUC, ROAD, max-sensitivity and the randomization test for each heatmap
    method (default: all).

    ROAD (at ``road_fractions``; empty: skipped) and max-sensitivity (``sensitivity_samples``
    noisy copies of radius ``sensitivity_radius``; 0: skipped) run on the first ``subset_images``
    images. Every method sees the same noisy copies, and the same ROAD noise stream.

    ``images`` are normalised ``[N, C, H, W]`` on the model's device; ``targets`` as for the
    methods (default: each image's predicted class). A method the model cannot support (CAM
    without GAP + linear head) is skipped with its reason unless it was asked for by name.
    """
    check_images(model, images)
    explicit = bool(methods)
    names = list(dict.fromkeys(methods)) if explicit else heatmap_methods()
    for name in names:
        if get_method(name).kind != "heatmap":
            raise ConfigError(f"{name} does not make a heatmap; faithfulness applies to: {', '.join(heatmap_methods())}")
    if layer is not None:
        get_layer(model, layer)  # a wrong name fails before any work, listing the valid ones
    resolved_layer = layer or default_layer(model, images)
    progress = on_progress or (lambda text: None)
    with model_state(model, grad=False):
        t = resolve_targets(targets, model(images))
    if subset_images < 1:
        raise ConfigError(f"subset images {subset_images}: give at least 1", parameter="subset_images")
    subset = min(subset_images, images.shape[0])
    noise = perturbations(images[:subset], sensitivity_samples, sensitivity_radius,
                          torch.Generator().manual_seed(seed)) if sensitivity_samples else None

    generator = torch.Generator().manual_seed(seed)
    start_images = insertion_start(images, start, baseline)

    def curves(order: Tensor) -> tuple[Tensor, Tensor]:
        deletion = perturbation_curves(model, images, t, order, mode="deletion", steps=steps, baseline=baseline, batch_size=batch_size)
        insertion = perturbation_curves(model, images, t, order, mode="insertion", steps=steps, start=start_images, batch_size=batch_size)
        return deletion, insertion

    progress("deletion / insertion: random pixel order")
    random_deletion, random_insertion = curves(random_order(images.shape, generator, images.device))
    random_del_auc, random_ins_auc = float(auc(random_deletion).mean()), float(auc(random_insertion).mean())

    explainers: dict[str, ExplainFn] = {}
    originals: dict[str, Tensor] = {}
    measured: dict[str, tuple[Tensor, Tensor, float]] = {}
    skipped: list[tuple[str, str]] = []
    extra: dict[str, dict[str, Any]] = {}  #: ROAD and max-sensitivity fields of each row
    for name in names:
        progress(f"deletion / insertion: {name}")
        started = time.perf_counter()
        explain = method_explainer(name, resolved_layer)
        try:
            maps = explain(model, images, t)
        except UnsupportedModelError as exc:
            if explicit:
                raise
            skipped.append((name, str(exc)))
            continue
        # one tie-break stream per method: its order does not depend on which other methods ran
        order = importance_order(maps, torch.Generator().manual_seed(seed))
        deletion, insertion = curves(order)
        explainers[name], originals[name] = explain, maps
        extra[name] = {}
        if road_fractions:
            progress(f"ROAD: {name}")
            stream = torch.Generator().manual_seed(seed)
            for kind in ("morf", "lerf"):
                found = road_curves(model, images[:subset], t[:subset], maps[:subset], kind, fractions=road_fractions,
                                    generator=stream, batch_size=batch_size)
                extra[name][f"road_{kind}"] = float(found.mean())
                extra[name][f"road_{kind}_curve"] = found.mean(dim=0).tolist()
        if noise is not None:
            progress(f"max-sensitivity: {name}")
            extra[name]["sensitivity"] = float(max_sensitivity(model, images[:subset], t[:subset], explain,
                                                               samples=sensitivity_samples, maps=maps[:subset],
                                                               noise=noise).mean())
        measured[name] = (deletion, insertion, time.perf_counter() - started)
    if not explainers:
        raise VisError("no heatmap method works on this model: " + "; ".join(f"{m}: {why}" for m, why in skipped))

    started = time.perf_counter()
    checks = randomization_checks(model, images, t, explainers, originals=originals, points=cascade_points,
                                  seed=seed, threshold=threshold, on_progress=progress)
    shared = (time.perf_counter() - started) / len(explainers)
    rows = []
    for name, (deletion, insertion, seconds) in measured.items():
        del_auc, ins_auc = float(auc(deletion).mean()), float(auc(insertion).mean())
        rows.append(FaithfulnessRow(
            method=name,
            layer=resolved_layer if METHODS[name].needs_layer else None,
            deletion_auc=del_auc,
            insertion_auc=ins_auc,
            randomization=checks[name],
            deletion_curve=deletion.mean(dim=0).tolist(),
            insertion_curve=insertion.mean(dim=0).tolist(),
            beats_random=del_auc < random_del_auc and ins_auc > random_ins_auc,
            seconds=seconds + shared,
            **extra[name],
        ))
    return FaithfulnessReport(
        rows=rank_rows(rows),
        random_deletion_auc=random_del_auc,
        random_insertion_auc=random_ins_auc,
        random_deletion_curve=random_deletion.mean(dim=0).tolist(),
        random_insertion_curve=random_insertion.mean(dim=0).tolist(),
        images=int(images.shape[0]),
        steps=steps,
        cascade_points=cascade_points,
        threshold=threshold,
        insertion_start=start,
        baseline=baseline,
        seed=seed,
        targets=t.tolist(),
        skipped=skipped,
        road_fractions=[float(f) for f in road_fractions],
        subset_images=subset if (road_fractions or noise is not None) else 0,
        sensitivity_samples=sensitivity_samples,
        sensitivity_radius=sensitivity_radius,
    )

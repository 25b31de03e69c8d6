"""The one list of methods the CLI and config choose from, and its common calling convention."""

from __future__ import annotations

import pytest
import torch
from vis_helpers import TinyCNN

from cnnvis.vis import METHODS, UnknownMethodError, VisError, gradcam, run_method
from cnnvis.vis.registry import get_method, split_params


def test_every_spec_is_complete() -> None:
    for name, spec in METHODS.items():
        assert spec.name == name and spec.description and callable(spec.function)
        assert spec.kind in ("heatmap", "activations", "filters", "images")
        assert (spec.normalize is not None) == (spec.kind == "heatmap")
    assert [n for n, s in METHODS.items() if s.requires_gap_linear] == ["cam"]
    assert {n for n, s in METHODS.items() if s.needs_layer} == {
        "activations", "filters", "gradcam", "gradcam++", "guided-gradcam", "deepdream",
        "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "ablationcam"}
    assert METHODS["integrated-gradients"].defaults["steps"] == 50
    assert METHODS["occlusion"].defaults["score"] == "prob"
    assert "layer" not in METHODS["maximize"].defaults and METHODS["maximize"].accepts_layer


def test_unknown_method_and_parameter_errors_list_the_choices() -> None:
    model, images = TinyCNN(), torch.randn(1, 1, 8, 8)
    with pytest.raises(UnknownMethodError, match="grad-cam'; did you mean gradcam.*choose one of: activations, filters"):
        run_method("grad-cam", model, images)
    with pytest.raises(VisError, match="steps.*valid parameters: samples=25, noise=0.15"):
        run_method("smoothgrad", model, images, steps=3)
    with pytest.raises(VisError, match="saliency does not work on a chosen layer"):
        run_method("saliency", model, images, layer="features.0")
    assert get_method("gradcam").function is gradcam


def test_run_method_equals_the_direct_call() -> None:
    model, images = TinyCNN(), torch.randn(2, 1, 10, 8)
    torch.testing.assert_close(run_method("gradcam", model, images, [1, 2], "features.5"),
                               gradcam(model, images, [1, 2], "features.5"))
    torch.testing.assert_close(run_method("gradcam", model, images), gradcam(model, images, "pred", "features.6"))


def test_maximize_through_the_registry_targets_predicted_classes_or_top_channels() -> None:
    model, images = TinyCNN(), torch.randn(2, 1, 10, 8)
    out = run_method("maximize", model, images, steps=2)
    assert out.shape == images.shape
    out = run_method("maximize", model, images, layer="features.2", steps=2)
    assert out.shape == images.shape
    with pytest.raises(VisError, match="channel index out of range"):
        run_method("maximize", model, images, [0, 99], layer="features.2", steps=2)


def test_method_parameters_are_checked_and_converted_to_the_declared_type() -> None:
    # what --param hands over: YAML scalars; each method gets the value as its function declares it
    given = split_params(["gradcam", "layercam", "vargrad", "occlusion"],
                         {"aug_smooth": 1, "relu": 0, "noise": 1, "window": [3, 5], "over": "guided-backprop"})
    assert given["gradcam"] == {"aug_smooth": True, "relu": False} and given["layercam"]["aug_smooth"] is True
    assert given["vargrad"] == {"noise": 1.0, "over": "guided-backprop"} and isinstance(given["vargrad"]["noise"], float)
    assert given["occlusion"] == {"window": (3, 5)}
    assert split_params(["saliency"], {"reduce": None}) == {"saliency": {"reduce": None}}  # Optional takes null
    assert split_params(["smoothgrad"], {"noise": "1e-2"}) == {"smoothgrad": {"noise": 0.01}}  # YAML's text for 1e-2
    bad = [
        (("gradcam", "layercam"), {"aug_smooth": "maybe"}, "param aug_smooth=maybe: gradcam, layercam take true or false "
                                                           "(1 or 0 work too), e.g. aug_smooth=true"),
        (("gradcam",), {"relu": 2}, "param relu=2: gradcam takes true or false (1 or 0 work too), e.g. relu=false"),
        (("vargrad",), {"samples": 2.5}, "param samples=2.5: vargrad takes a whole number, e.g. samples=25"),
        (("smoothgrad",), {"noise": "lots"}, "param noise=lots: smoothgrad takes a number, e.g. noise=0.15"),
        (("smoothgrad",), {"over": "guided"}, "param over=guided: smoothgrad takes one of saliency, input-x-gradient, "
                                              "guided-backprop, deconvnet, integrated-gradients (did you mean "
                                              "guided-backprop?), e.g. over=saliency"),
        (("occlusion",), {"window": "abc"}, "param window=abc: occlusion takes a whole number or a list of 2 whole "
                                            "numbers or null, e.g. window=3"),
        (("maximize", "deepdream"), {"steps": "x"}, "param steps=x: maximize takes a whole number or null; deepdream "
                                                    "takes a whole number, e.g. steps=3"),
    ]
    for names, params, message in bad:
        with pytest.raises(VisError) as info:
            split_params(list(names), params)
        assert str(info.value) == message and info.value.parameter == "param" and info.value.exit_code == 2

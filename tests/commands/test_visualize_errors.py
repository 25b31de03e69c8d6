"""Bad visualize requests: unknown method or layer, no checkpoint yet, files that are not images."""

from __future__ import annotations

import shutil

import pytest

from cnnvis.data.images import load_rgb
from cnnvis.errors import CheckpointError, DataError
from cnnvis.run import load_run


def test_unknown_visualization_method_lists_the_valid_names():
    # library level until `cnnvis visualize` exists: the command takes its choices from this registry
    from cnnvis.errors import VisError
    from cnnvis.vis.registry import get_method, method_names

    with pytest.raises(VisError, match="unknown visualisation method 'gradcamm'; did you mean gradcam.*choose one of: ") as info:
        get_method("gradcamm")
    assert all(name in str(info.value) for name in method_names())
    assert info.value.exit_code == 2


def test_visualize_a_run_with_no_checkpoint_yet(run_copy):
    shutil.rmtree(run_copy / "checkpoints")
    (run_copy / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="has no checkpoint yet. Train it first") as info:
        load_run(run_copy)
    assert info.value.exit_code == 2


def test_visualize_unknown_layer_lists_the_layer_names(trained):
    from cnnvis.errors import LayerNotFoundError
    from cnnvis.vis.hooks import get_layer

    model = load_run(trained).model
    with pytest.raises(LayerNotFoundError, match="no layer 'features.99' in MnistCNN; did you mean features.9, .*\\? valid layer names: features, features.0,") as info:
        get_layer(model, "features.99")
    assert "features.13" in str(info.value) and "fc" in str(info.value)


@pytest.mark.parametrize(("content", "reason"), [(b"not a picture", "not an image"), (b"", "empty file")])
def test_visualize_image_that_is_not_an_image(tmp_path, content, reason):
    path = tmp_path / "cat.jpg"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"cat.jpg: {reason}. Give a PNG, JPEG") as info:
        load_rgb(path)
    assert info.value.exit_code == 2
    with pytest.raises(DataError, match="image not found"):
        load_rgb(tmp_path / "dog.jpg")

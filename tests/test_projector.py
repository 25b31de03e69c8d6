"""The embedding projector: the final linear layer's input for every project architecture, and the
files TensorBoard's Projector tab reads (config, tensors, labels, sprite) with one row per image."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.tensorboard import SummaryWriter

from cnnvis.errors import UnsupportedModelError
from cnnvis.models import build_model
from cnnvis.projector import final_linear, log_embedding, penultimate_features

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch, channels, size, features", [
    ("mnist_cnn", 1, 28, None), ("mnist_classic", 1, 28, None), ("resnet_small", 3, 32, None), ("resnet18", 3, 32, 512),
])
def test_features_are_the_input_of_the_classifier_head(arch, channels, size, features):
    model = build_model(arch, num_classes=4, in_channels=channels, image_size=size).train()
    name, head = final_linear(model)
    images = torch.randn(6, channels, size, size)
    dataset = TensorDataset(images, torch.arange(6) % 4)
    stats = [b.clone() for b in model.buffers()]
    found = penultimate_features(model, dataset, limit=5)
    assert model.training and all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))  # eval inside, restored
    model.eval()
    assert found.features.shape == (5, head.in_features) and (features is None or head.in_features == features)
    # the head applied to the features gives the model's own logits: they are what it decides on
    with torch.no_grad():
        assert torch.allclose(head(found.features), model(images[:5]), atol=1e-5)
    assert found.labels.tolist() == [0, 1, 2, 3, 0] and found.layer == name
    assert not any(module._forward_pre_hooks for module in model.modules())  # the hook is gone
    assert found.thumbnails.shape == (5, 3, min(size, 32), min(size, 32))
    assert 0 <= found.thumbnails.min() and found.thumbnails.max() <= 1


def test_projector_files_have_one_labelled_row_per_image(tmp_path):
    model = build_model("mnist_cnn", num_classes=3).eval()
    dataset = TensorDataset(torch.randn(20, 1, 28, 28), torch.arange(20) % 3)
    writer = SummaryWriter(str(tmp_path))
    found = log_embedding(writer, model, dataset, ["cat", "dog", "eel"], limit=7, step=3)
    writer.close()
    assert "penultimate" in (tmp_path / "projector_config.pbtxt").read_text()
    folder = tmp_path / "00003" / "penultimate"
    rows = (folder / "tensors.tsv").read_text().splitlines()
    metadata = [line.split("\t") for line in (folder / "metadata.tsv").read_text().splitlines()]
    assert len(rows) == 7 and len(rows[0].split("\t")) == found.features.shape[1]
    assert metadata[0] == ["class", "predicted", "image"] and len(metadata) == 8
    # spread evenly over the data set (every second image), each with its class name
    assert [m[2] for m in metadata[1:]] == [f"test #{i}" for i in range(0, 14, 2)]
    assert [m[0] for m in metadata[1:]] == [["cat", "dog", "eel"][i % 3] for i in range(0, 14, 2)]
    with Image.open(folder / "sprite.png") as sprite:
        assert sprite.size == (3 * 28, 3 * 28)  # 7 thumbnails, 3 a row


def test_a_model_without_a_linear_head_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        penultimate_features(model, TensorDataset(torch.randn(2, 1, 8, 8), torch.zeros(2)))

"""Embedding networks and pretrained weights from a path (never downloaded)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import EmbeddingNet, build_model


@pytest.mark.parametrize("backbone", ["tiny_cnn", "resnet18"])
def test_embeddings_are_normalised_with_the_configured_size(backbone):
    model = EmbeddingNet(backbone, 32).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_pretrained_backbone_loads_from_a_path(tmp_path):
    source = EmbeddingNet("resnet18", 16)
    state = dict(source.backbone.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)  # a torchvision checkpoint's classifier: ignored
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    config = load_config("local", ["model.backbone=resnet18", f"model.pretrained={path}"])
    model = build_model(config.model)
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)


def test_pretrained_weights_of_another_network_are_rejected(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(EmbeddingNet("tiny_cnn", 16).backbone.state_dict(), path)
    config = load_config("local", ["model.backbone=resnet18", f"model.pretrained={path}"])
    with pytest.raises(ValueError, match="does not fit backbone"):
        build_model(config.model)


def test_weights_of_other_shapes_or_no_state_dict_are_rejected_naming_the_setting(tmp_path):
    """A layer name that fits with a shape that does not, and files that are not a state_dict:
    each a ValueError naming the setting (the preflight refuses the run), not torch's error."""
    narrow = tmp_path / "narrow.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, narrow)
    config = load_config("local", [f"model.pretrained={narrow}"])
    with pytest.raises(ValueError, match=r"does not fit backbone \(size mismatch for features.0.weight"):
        build_model(config.model)
    for name, content in (("junk.pth", b"not a torch file"), ("list.pth", None)):
        path = tmp_path / name
        if content is None:
            torch.save([1, 2], path)
        else:
            path.write_bytes(content)
        config = load_config("local", [f"model.pretrained={path}"])
        with pytest.raises(ValueError, match=f"model.pretrained: {path} (is not a state_dict|holds a list)"):
            build_model(config.model)


def test_missing_weights_file_names_the_setting(tmp_path):
    config = load_config("local", [f"model.pretrained={tmp_path / 'nope.pth'}"])
    with pytest.raises(FileNotFoundError, match="model.pretrained: no weights at"):
        build_model(config.model)

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


def test_the_projection_runs_in_float32_under_bf16_autocast():
    """Under bf16 autocast (training and evaluation on a GPU) the backbone runs in bf16 but the
    projection and normalisation do not: embeddings keep float32's resolution, so retrieval and
    mining order near neighbours as in float32. (CPU autocast, the same code path.)"""
    torch.manual_seed(0)
    model = EmbeddingNet("tiny_cnn", 32).eval()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        features = model.backbone((images - model.mean) / model.std)
    assert features.dtype == torch.bfloat16  # (the backbone does run in bf16)
    assert out.dtype == torch.float32
    expected = torch.nn.functional.normalize(model.head(features.float()), dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast on the GPU)")
def test_export_embeds_as_the_training_run_s_evaluation_does_on_a_gpu(ray_local):
    """`jobs.evaluate` and export (EmbedImages) use the precision of training's evaluation
    (`embed_rows` with `autocast_dtype`): on a GPU both bf16, so their embeddings agree."""
    import io

    import numpy as np
    import ray
    from PIL import Image

    from pipeline.data.decoding import decode_rgb, eval_transform
    from pipeline.device_feed import autocast_dtype, embed_rows
    from pipeline.serving.embedding import EmbedImages, embedding_matrix

    torch.manual_seed(0)
    model = EmbeddingNet("resnet18", 16)
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(6):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
        encoded.append(buffer.getvalue())
    embed = EmbedImages([ray.put(model.state_dict())], {"backbone": "resnet18", "embedding_dim": 16}, 32, 36)
    exported = embedding_matrix(embed({"id": np.arange(6), "label": np.zeros(6, np.int32),
                                       "image": np.array(encoded, dtype=object)}))
    device = torch.device("cuda")
    transform = eval_transform(32, 36)
    images = torch.stack([transform(decode_rgb(data)) for data in encoded]).numpy()  # uint8, as evaluation's
    model.to(device).eval()
    with torch.no_grad():
        (_, evaluated), = embed_rows(model, [images], device, lambda batch: batch, autocast_dtype(device))
    # (float32 against bf16 differs by ~5e-3 here, as measured with CPU autocast)
    np.testing.assert_allclose(exported, evaluated, rtol=0, atol=1e-5)


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

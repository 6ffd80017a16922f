"""Embedding networks: a backbone (torchvision ResNet or a tiny CNN) and a linear head.

Weights are never downloaded: `model.pretrained` names a local path or a URI (s3://...) of a
state_dict, loaded with `weights_only=True`.
"""

from __future__ import annotations

import io
import pickle

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# ImageNet statistics: pretrained torchvision weights expect them; harmless from scratch.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class TinyCNN(nn.Module):
    """Four conv blocks and global pooling (~100k parameters) for CPU runs and tests.

    GroupNorm rather than BatchNorm: its output depends on each example alone, so a DDP run
    on 2 ranks computes exactly what one process computes on the concatenated batch.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 96, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
                nn.GroupNorm(8, width),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.out_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def _resnet(name: str) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, name)(weights=None)
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """The backbone module and its feature width."""
    if name == "tiny_cnn":
        net = TinyCNN()
        return net, net.out_features
    if name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        return _resnet(name)
    raise ValueError(f"model.backbone: unknown backbone {name!r}")


class EmbeddingNet(nn.Module):
    """Backbone, linear projection to `dim`, optional L2 normalisation.

    Input: float images in [0, 1], shape [N, 3, H, W]; the ImageNet normalisation happens
    here so every caller (training, evaluation, export) feeds the same thing.
    """

    def __init__(self, backbone: str, embedding_dim: int, normalize: bool = True):
        super().__init__()
        self.backbone, width = build_backbone(backbone)
        self.head = nn.Linear(width, embedding_dim)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone((images - self.mean) / self.std)
        # The projection and normalisation in float32 under bf16 autocast too: the embedding's
        # 8-bit bf16 mantissa would tie near neighbours that retrieval and mining must order.
        with torch.autocast(features.device.type, enabled=False):
            x = self.head(features.to(self.head.weight.dtype))  # (float32, or a float64 model's)
        return F.normalize(x, dim=1) if self.normalize else x


def read_bytes(uri: str) -> bytes:
    """Bytes of a local path or any URI pyarrow understands (s3://, gs://, file://)."""
    from pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def load_pretrained_backbone(model: EmbeddingNet, uri: str) -> list[str]:
    """Load a backbone state_dict from `uri` (never downloads from a hub); returns missing keys.

    A torchvision checkpoint's `fc.*` keys are ignored: the head is ours.
    """
    try:
        state = torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.pretrained: no weights at {uri}") from err
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:  # torch's words for "not this"
        raise ValueError(f"model.pretrained: {uri} is not a state_dict that torch.load reads "
                         f"with weights_only=True ({type(err).__name__})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained: {uri} holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # the same names with other shapes: another variant's weights
        raise ValueError(f"model.pretrained: {uri} does not fit backbone "
                         f"({str(err).strip().splitlines()[-1].strip()})") from err
    if result.unexpected_keys:
        raise ValueError(
            f"model.pretrained: {uri} does not fit backbone "
            f"(unexpected keys such as {result.unexpected_keys[:3]})"
        )
    return list(result.missing_keys)


def build_model(model_config) -> EmbeddingNet:
    """The configured embedding network, with pretrained backbone weights if given."""
    model = EmbeddingNet(model_config.backbone, model_config.embedding_dim, model_config.normalize)
    if model_config.pretrained:
        missing = load_pretrained_backbone(model, model_config.pretrained)
        if missing:
            raise ValueError(
                f"model.pretrained: {model_config.pretrained} lacks backbone weights "
                f"such as {missing[:3]}"
            )
    return model

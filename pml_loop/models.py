"""Trunks and embedders for the benchmarks.

- :class:`GlyphCNN`: a small 4-block CNN for the 16x16 / 32x32 glyphs.
- :class:`MLP`: the embedder of powerful-benchmarker configs
  (``{MLP: {layer_sizes: [128]}}``).
- :func:`load_trunk`: any ``nn.Module`` from a dotted import path, with
  weights from a local file and its classifier head optionally removed.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = ["GlyphCNN", "MLP", "load_trunk", "import_object"]


class GlyphCNN(nn.Module):
    """Four conv blocks (3x3 conv, BatchNorm, ReLU), 2x2 max-pool after the
    first three, global average pooling, optional linear projection.

    Args:
        in_channels: image channels (1 for glyphs).
        channels: output channels of the four blocks.
        out_dim: size of a final linear layer; ``None`` returns the pooled
            ``channels[-1]`` features.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, output_size]``; any H, W >= 8
    works (16 -> 2x2, 32 -> 4x4 before the global pooling).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 128),
        out_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        blocks = []
        previous = in_channels
        for i, width in enumerate(channels):
            blocks += [
                nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if i < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            previous = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, out_dim) if out_dim is not None else nn.Identity()
        #: size of the output vectors, for building an embedder on top.
        self.output_size = out_dim if out_dim is not None else previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    """Linear layers with ReLU in between (and after the last one if
    ``final_relu``).

    Args:
        layer_sizes: ``[in, hidden..., out]``; a single ``[out]`` infers the
            input size at the first call (``nn.LazyLinear``).
        final_relu: end with a ReLU too.

    Shapes: ``[B, in]`` -> ``[B, layer_sizes[-1]]``.
    """

    def __init__(self, layer_sizes: Sequence[int], final_relu: bool = False) -> None:
        super().__init__()
        sizes = [int(s) for s in layer_sizes]
        if not sizes:
            raise ValueError("MLP needs at least one layer size")
        layers: list = []
        if len(sizes) == 1:
            layers.append(nn.LazyLinear(sizes[0]))
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            if layers:
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.Linear(fan_in, fan_out))
        if final_relu:
            layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)
        self.output_size = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def import_object(import_path: str) -> Any:
    """The object named by ``"package.module.Name"`` (nested attributes such
    as ``"package.module.Class.factory"`` work too)."""
    parts = import_path.split(".")
    for split_at in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split_at])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only swallow "this prefix is not a module"; a module that fails
            # to import because of its own missing dependency must surface.
            if err.name is not None and not module_name.startswith(err.name):
                raise
            continue
        try:
            for attr in parts[split_at:]:
                obj = getattr(obj, attr)
        except AttributeError as err:
            raise ImportError(f"cannot find {import_path!r}: {err}") from err
        return obj
    raise ImportError(f"cannot import {import_path!r}: no importable module prefix")


def _set_submodule(model: nn.Module, dotted: str, value: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise AttributeError(f"{type(model).__name__} has no submodule {dotted!r} to strip")
    setattr(parent, child, value)


def _state_dict_from(checkpoint: Any, path: Path) -> dict:
    """The state dict inside a saved object: a plain state dict, or a
    checkpoint dict holding one under ``"state_dict"`` / ``"model"``."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state dict or checkpoint dict, got {type(checkpoint).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    # Weights saved from DataParallel / DistributedDataParallel carry "module.".
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def load_trunk(
    import_path: str,
    weights: Optional[os.PathLike] = None,
    strip_classifier: Optional[str] = None,
    strict: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build a trunk from a dotted import path and load local weights.

    Args:
        import_path: ``"package.module.ClassOrFactory"``, called with ``kwargs``.
        weights: a file saved with ``torch.save``: a state dict, or a dict
            holding one under ``"state_dict"`` or ``"model"``. Loaded on CPU
            with ``weights_only=True`` (no arbitrary code runs).
        strip_classifier: dotted name of a submodule (e.g. ``"fc"``,
            ``"classifier.6"``) replaced by ``nn.Identity`` *after* loading,
            so the checkpoint's classifier weights still match.
        strict: passed to ``load_state_dict``.

    Returns:
        the module (in train mode, on CPU).
    """
    factory = import_object(import_path)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{import_path} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"trunk weights for {import_path} not found: {path}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_state_dict_from(checkpoint, path), strict=strict)
    if strip_classifier:
        _set_submodule(model, strip_classifier, nn.Identity())
    return model

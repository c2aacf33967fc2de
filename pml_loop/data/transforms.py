"""Image transforms with PIL and torch only (torchvision cannot be installed
beside the CPU torch used here).

Each is a small callable class whose constructor takes plain numbers, so a
YAML config can name it: ``{RandomResizedCrop: {size: 227}}``. The geometric
ones accept a PIL image or a tensor ``[..., H, W]``; randomness comes from
torch's global generator, so DataLoader workers are seeded the usual way.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Size = Union[int, Sequence[int]]
ImageLike = Union[Image.Image, torch.Tensor]

__all__ = [
    "Compose", "ToTensor", "Normalize", "Resize", "CenterCrop",
    "RandomResizedCrop", "RandomHorizontalFlip", "RandomShift",
]


def _pair(size: Size) -> Tuple[int, int]:
    """``(height, width)`` from an int or a 2-sequence."""
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _hw(image: ImageLike) -> Tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def _crop(image: ImageLike, top: int, left: int, height: int, width: int) -> ImageLike:
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + width, top + height))
    return image[..., top : top + height, left : left + width]


def _resize(image: ImageLike, height: int, width: int) -> ImageLike:
    if isinstance(image, Image.Image):
        return image.resize((width, height), Image.BILINEAR)
    batched = image if image.dim() == 4 else image.unsqueeze(0)
    out = F.interpolate(
        batched.float(), size=(height, width), mode="bilinear",
        align_corners=False, antialias=True,
    )
    return out if image.dim() == 4 else out.squeeze(0)


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class ToTensor:
    """PIL image or uint8 HxW(xC) array -> float tensor ``[C, H, W]`` in [0, 1].

    Palette and other modes are converted to RGB first (``"L"`` stays one
    channel), so a dataset with a few odd files still gives uniform tensors.
    """

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image.float()
        if isinstance(image, Image.Image):
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            image = np.array(image)  # a writable copy for torch.from_numpy
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return tensor.float() / 255.0 if array.dtype == np.uint8 else tensor.float()


class Normalize:
    """``(x - mean) / std`` per channel of a tensor ``[C, H, W]`` or ``[B, C, H, W]``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if (self.std == 0).any():
            raise ValueError(f"std must be non-zero, got {list(std)}")

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


class Resize:
    """Resize: an int scales the *shorter* side to ``size`` (aspect kept), a
    pair gives the exact ``(height, width)``."""

    def __init__(self, size: Size) -> None:
        self.size = size

    def __call__(self, image: ImageLike) -> ImageLike:
        h, w = _hw(image)
        if isinstance(self.size, int):
            scale = self.size / min(h, w)
            height, width = max(1, round(h * scale)), max(1, round(w * scale))
        else:
            height, width = _pair(self.size)
        return _resize(image, height, width)


class CenterCrop:
    """Crop the central ``size`` region (an image smaller than that is an error)."""

    def __init__(self, size: Size) -> None:
        self.size = _pair(size)

    def __call__(self, image: ImageLike) -> ImageLike:
        h, w = _hw(image)
        height, width = self.size
        if height > h or width > w:
            raise ValueError(f"CenterCrop{self.size} of a {h}x{w} image")
        return _crop(image, (h - height) // 2, (w - width) // 2, height, width)


class RandomResizedCrop:
    """Crop a random region of ``scale`` x the area and aspect ratio in
    ``ratio`` (log-uniform), then resize it to ``size``; after 10 failed
    draws fall back to a central crop (the usual Inception-style crop)."""

    def __init__(
        self,
        size: Size,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def sample_box(self, h: int, w: int) -> Tuple[int, int, int, int]:
        """``(top, left, height, width)`` of a random crop of an h x w image."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            width = round(math.sqrt(target * aspect))
            height = round(math.sqrt(target / aspect))
            if 0 < width <= w and 0 < height <= h:
                top = int(torch.randint(0, h - height + 1, (1,)))
                left = int(torch.randint(0, w - width + 1, (1,)))
                return top, left, height, width
        # Fallback: the largest central crop with the aspect ratio in range.
        aspect = w / h
        if aspect < self.ratio[0]:
            width, height = w, round(w / self.ratio[0])
        elif aspect > self.ratio[1]:
            height, width = h, round(h * self.ratio[1])
        else:
            height, width = h, w
        return (h - height) // 2, (w - width) // 2, height, width

    def __call__(self, image: ImageLike) -> ImageLike:
        top, left, height, width = self.sample_box(*_hw(image))
        return _resize(_crop(image, top, left, height, width), *self.size)


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: ImageLike) -> ImageLike:
        if torch.rand(1).item() >= self.p:
            return image
        if isinstance(image, Image.Image):
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        return image.flip(-1)


class RandomShift:
    """Translate a tensor ``[..., H, W]`` by up to ``max_shift`` pixels in each
    direction, filling with ``fill`` (0 = background for the glyphs, whose
    ink is 1). Unlike a roll, nothing wraps around to the other side."""

    def __init__(self, max_shift: int = 2, fill: float = 0.0) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift = int(max_shift)
        self.fill = fill

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError("RandomShift works on tensors; put it after ToTensor")
        s = self.max_shift
        if s == 0:
            return tensor
        dy, dx = (torch.randint(-s, s + 1, (2,))).tolist()
        return shift(tensor, dy, dx, self.fill)


def shift(tensor: torch.Tensor, dy: int, dx: int, fill: float = 0.0) -> torch.Tensor:
    """Translate ``[..., H, W]`` down by ``dy`` and right by ``dx`` pixels
    (negative: up/left), filling the uncovered border with ``fill``."""
    h, w = tensor.shape[-2:]
    padded = F.pad(tensor, (abs(dx), abs(dx), abs(dy), abs(dy)), value=fill)
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[..., top : top + h, left : left + w]

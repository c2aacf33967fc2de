"""KanjiGlyphs: CJK ideographs rendered in many font faces, as a retrieval set.

A class is one ideograph, an instance is one font face. The data is a single
``kanji_glyphs.npz`` made by :mod:`pml_loop.data.build_glyphs`; a prebuilt
copy ships with the package (see ``glyphs/README.md`` for the faces and their
licences). Everything is loaded into one uint8 tensor up front: the whole
training split is a few MB, so a benchmark can index it directly instead of
going through a DataLoader.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .splits import select_split, split_classes

GLYPH_FILENAME = "kanji_glyphs.npz"
GLYPH_SPLITS = ("train", "val", "test", "train+val")


def shipped_glyph_path() -> Path:
    """Path of the prebuilt ``kanji_glyphs.npz`` inside the installed package."""
    return Path(str(resources.files("pml_loop.data") / "glyphs" / GLYPH_FILENAME))


def glyph_path(root: Optional[os.PathLike]) -> Path:
    """``root/kanji_glyphs.npz``, or the shipped copy when ``root`` is None;
    raises FileNotFoundError naming what was expected where."""
    path = shipped_glyph_path() if root is None else Path(root) / GLYPH_FILENAME
    if not path.is_file():
        where = "the shipped copy" if root is None else f"root={root!s}"
        raise FileNotFoundError(
            f"KanjiGlyphs expected {GLYPH_FILENAME} at {path} ({where}); build it with "
            f"`python -m pml_loop.data.build_glyphs --font_dir DIR --out {path}`"
        )
    return path


@functools.lru_cache(maxsize=2)
def _load_npz(path: str, mtime: float) -> Dict[str, np.ndarray]:
    # Cached so that building train, val and test splits decompresses once;
    # mtime is part of the key so a rebuilt file is read again.
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def load_glyph_arrays(root: Optional[os.PathLike] = None) -> Dict[str, np.ndarray]:
    """All arrays of the glyph file (see :func:`build_glyphs.save_glyph_set`).

    The returned arrays are shared between callers: do not modify them.
    """
    path = glyph_path(root)
    arrays = _load_npz(str(path), path.stat().st_mtime)
    if arrays["images"].ndim != 4 or arrays["images"].dtype != np.uint8:
        raise ValueError(
            f"{path}: 'images' must be uint8 [faces, classes, H, W], got "
            f"{arrays['images'].dtype} {arrays['images'].shape}"
        )
    return arrays


def split_faces(
    groups: Sequence[str], holdout_fraction: float, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Choose whole groups of faces (e.g. a font package) to hold out.

    Groups are visited in a seeded random order and held out until at least
    ``round(holdout_fraction * num_faces)`` faces are; a group is never split,
    so sibling faces (weights or regional cuts of one design) stay together.
    At least one face always remains on the training side.

    Returns:
        ``(kept, held_out)``: sorted face indices; ``held_out`` is empty for
        a fraction of 0.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_faces must be in [0, 1), got {holdout_fraction}")
    groups = np.asarray(groups)
    all_faces = np.arange(len(groups))
    target = int(round(holdout_fraction * len(groups)))
    if target == 0:
        return all_faces, all_faces[:0]
    unique = np.unique(groups)
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    held = np.zeros(len(groups), dtype=bool)
    for group in order:
        if held.sum() >= target:
            break
        members = groups == group
        if (held | members).all():
            continue  # would leave nothing to train on
        held |= members
    return all_faces[~held], all_faces[held]


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Area-average uint8 ``[N, S, S]`` glyphs to uint8 ``[N, size, size]``."""
    stored = images.shape[-1]
    if size == stored:
        return images
    if size > stored:
        raise ValueError(f"size={size} is larger than the stored glyphs ({stored}x{stored})")
    x = torch.from_numpy(images).float().unsqueeze(1)
    x = F.adaptive_avg_pool2d(x, size)  # exact area average for integer factors
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


class KanjiGlyphs(Dataset):
    """Class-disjoint retrieval splits of the kanji-glyph set.

    Args:
        root: folder holding ``kanji_glyphs.npz``; ``None`` uses the shipped copy.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"train+val"``.
        fold, num_folds: train/val fold of the non-test classes.
        transform: applied to each float tensor ``[1, size, size]``.
        size: side of the returned glyphs (area-downsampled from the stored
            32x32; 16 leaves room between methods, 32 saturates).
        num_train_classes: cap on the train classes (``None``: all of the fold).
        holdout_faces: fraction of faces held out, by whole font package;
            held-out faces appear only in ``"test"``, and ``"test"`` uses only
            them. 0 uses every face in every split.
        seed: shuffles the classes (and the held-out packages).

    Attributes:
        images: uint8 tensor ``[N, 1, size, size]`` (ink = 255).
        labels: int64 ``[N]`` original class ids (index into ``codepoints``).
        faces: int64 ``[N]`` face index of each sample (into ``face_names``).
        classes: sorted class ids of this split.
        codepoints: int ``[num_all_classes]``, the ideograph of each class id.
        face_names, packages, licences: per face, from the glyph file.
    """

    def __init__(
        self,
        root: Optional[os.PathLike] = None,
        split: str = "train",
        fold: int = 0,
        num_folds: int = 4,
        transform: Optional[Callable] = None,
        size: int = 16,
        num_train_classes: Optional[int] = None,
        holdout_faces: float = 0.0,
        seed: int = 0,
    ) -> None:
        if split not in GLYPH_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {GLYPH_SPLITS}")
        arrays = load_glyph_arrays(root)
        stored = arrays["images"]  # [F, C, S, S]
        num_faces, num_classes = stored.shape[:2]
        self.split = split
        self.transform = transform
        self.size = size
        self.codepoints = arrays["codepoints"]
        self.face_names = arrays["face_names"]
        self.packages = arrays.get("packages", self.face_names)
        self.licences = arrays.get("licences", np.full(num_faces, ""))

        splits = split_classes(
            np.arange(num_classes), seed=seed, fold=fold, num_folds=num_folds,
            num_train_classes=num_train_classes,
        )
        self.classes = select_split(splits, split)
        # Faces from no known package are grouped by their font file instead.
        groups = np.where(self.packages != "", self.packages, arrays["font_files"])
        train_faces, test_faces = split_faces(groups, holdout_faces, seed)
        faces = test_faces if (split == "test" and len(test_faces)) else train_faces
        self.face_ids = faces

        # Class-major order: sample i is class classes[i // F'], face faces[i % F'].
        chosen = stored[faces][:, self.classes]  # [F', C', S, S]
        chosen = chosen.transpose(1, 0, 2, 3).reshape(-1, *stored.shape[2:])
        self.images = torch.from_numpy(np.ascontiguousarray(downsample(chosen, size))).unsqueeze(1)
        self.labels = np.repeat(self.classes, len(faces)).astype(np.int64)
        self.faces = np.tile(faces, len(self.classes)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> Tuple[torch.Tensor, int]:
        image = self.images[idx].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[idx])

    def as_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every sample at once, without the transform: float ``[N, 1, size,
        size]`` in [0, 1] and int64 labels ``[N]``."""
        return self.images.float() / 255.0, torch.from_numpy(self.labels)

    def chars(self) -> str:
        """The ideographs of this split, in class-id order."""
        return "".join(chr(int(cp)) for cp in self.codepoints[self.classes])

    def __repr__(self) -> str:
        return (
            f"KanjiGlyphs(split={self.split!r}, classes={len(self.classes)}, "
            f"faces={len(self.face_ids)}, samples={len(self)}, size={self.size})"
        )

"""The shared part of the photo datasets: a list of (path, class) pairs, cut
into class-disjoint splits, read with PIL on access.

Subclasses only parse their folder layout (:meth:`ImageListDataset.read_index`)
and say which classes are the conventional train and test halves. Nothing is
ever downloaded: a missing or incomplete folder raises
:class:`DatasetLayoutError`, which says what was expected where.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .splits import fixed_split_classes, select_split

IMAGE_SPLITS = ("train", "val", "test", "train+val", "train+test")


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing, or lacks a file the layout needs."""


def require_file(path: Path, dataset: str, layout: str) -> Path:
    """``path`` if it is a file, else a DatasetLayoutError naming it."""
    if not path.is_file():
        raise DatasetLayoutError(
            f"{dataset}: expected the file {path}, not found.\n"
            f"Expected layout:\n{layout}"
        )
    return path


class ImageListDataset(Dataset):
    """A class-disjoint split of a list of image files.

    Args:
        root: dataset folder (see the subclass for its layout).
        split: ``"train"``, ``"test"``, ``"train+test"`` (the standard halves),
            or with a ``fold``: ``"train"`` / ``"val"`` (a fold of the train
            classes) and ``"train+val"`` (all train classes).
        transform: applied to each PIL image (RGB).
        target_transform: applied to each int label.
        fold, num_folds: ``fold=None`` (default) keeps the standard split;
            otherwise the sorted train classes are cut into ``num_folds``
            contiguous chunks and ``"val"`` is chunk ``fold``.

    Attributes:
        paths: list of image paths of this split.
        labels: int64 ``[N]`` original class ids.
        classes: sorted class ids of this split.
    """

    #: Name used in error messages.
    name = "dataset"
    #: A short picture of the expected folder layout, for error messages.
    layout = ""

    def __init__(
        self,
        root: os.PathLike,
        split: str = "train",
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        fold: Optional[int] = None,
        num_folds: int = 4,
    ) -> None:
        if split not in IMAGE_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {IMAGE_SPLITS}")
        if split == "val" and fold is None:
            raise ValueError(f"{self.name}: split='val' needs a fold (e.g. fold=0)")
        if root is None:
            raise DatasetLayoutError(
                f"{self.name}: no dataset folder given (pass --dataset_root DIR, the folder "
                f"that holds the dataset).\nExpected layout:\n{self.layout}"
            )
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetLayoutError(
                f"{self.name}: dataset folder {self.root} does not exist.\n"
                f"Expected layout:\n{self.layout}"
            )
        self.split = split
        self.transform = transform
        self.target_transform = target_transform

        paths, labels = self.read_index()
        labels = np.asarray(labels, dtype=np.int64)
        train_classes, test_classes = self.standard_classes(np.unique(labels))
        splits = fixed_split_classes(train_classes, test_classes, fold=fold, num_folds=num_folds)
        self.classes = select_split(splits, split)
        keep = np.isin(labels, self.classes)
        self.paths: List[Path] = [p for p, k in zip(paths, keep) if k]
        self.labels = labels[keep]

    def read_index(self) -> Tuple[List[Path], Sequence[int]]:
        """Every image of the dataset (both halves) and its class id."""
        raise NotImplementedError

    def standard_classes(self, classes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The conventional ``(train_classes, test_classes)``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int):
        with Image.open(self.paths[idx]) as image:
            image = image.convert("RGB")
        label = int(self.labels[idx])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"classes={len(self.classes)}, images={len(self)})"
        )


def first_existing_dir(candidates: Sequence[Path]) -> Optional[Path]:
    """The first of ``candidates`` that is a folder, or None."""
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None

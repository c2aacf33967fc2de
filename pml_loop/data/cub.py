"""CUB-200-2011 from a local folder (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

from .image_list import DatasetLayoutError, ImageListDataset, first_existing_dir, require_file

CUB_LAYOUT = """\
  ROOT/CUB_200_2011/images.txt             "<image_id> <relative path>" per line
  ROOT/CUB_200_2011/image_class_labels.txt "<image_id> <class_id 1..200>" per line
  ROOT/CUB_200_2011/images/<class folder>/<file>.jpg
(ROOT may also be the CUB_200_2011 folder itself)"""


class CUB200(ImageListDataset):
    """Caltech-UCSD Birds 200-2011; classes 1-100 train, 101-200 test.

    Reads the layout of the official archive (and of PML's ``CUB``).
    See :class:`ImageListDataset` for the arguments.
    """

    name = "CUB200"
    layout = CUB_LAYOUT
    num_train_classes = 100

    def read_index(self) -> Tuple[List[Path], np.ndarray]:
        base = first_existing_dir([self.root / "CUB_200_2011", self.root])
        images_txt = require_file(base / "images.txt", self.name, self.layout)
        labels_txt = require_file(base / "image_class_labels.txt", self.name, self.layout)
        if not (base / "images").is_dir():
            raise DatasetLayoutError(
                f"{self.name}: expected the folder {base / 'images'}, not found.\n"
                f"Expected layout:\n{self.layout}"
            )
        relative = dict(_two_columns(images_txt))
        labels = dict(_two_columns(labels_txt))
        missing = sorted(set(relative) ^ set(labels))
        if missing:
            raise DatasetLayoutError(
                f"{self.name}: images.txt and image_class_labels.txt disagree on "
                f"image ids, e.g. {missing[:5]}"
            )
        ids = sorted(relative, key=int)
        return [base / "images" / relative[i] for i in ids], np.array([int(labels[i]) for i in ids])

    def standard_classes(self, classes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return classes[classes <= self.num_train_classes], classes[classes > self.num_train_classes]


def _two_columns(path: Path) -> List[Tuple[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DatasetLayoutError(f"{path}:{number}: expected 2 columns, got {line!r}")
        rows.append((fields[0], fields[1]))
    return rows

"""Stanford Online Products from a local folder (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

from .image_list import DatasetLayoutError, ImageListDataset, first_existing_dir, require_file

SOP_LAYOUT = """\
  ROOT/Stanford_Online_Products/Ebay_train.txt  header, then "image_id class_id super_class_id path"
  ROOT/Stanford_Online_Products/Ebay_test.txt   same columns
  ROOT/Stanford_Online_Products/<path>          e.g. bicycle_final/111085122871_0.JPG
(ROOT may also be the Stanford_Online_Products folder itself)"""


class StanfordOnlineProducts(ImageListDataset):
    """Stanford Online Products: train classes are those of ``Ebay_train.txt``
    (11,318), test those of ``Ebay_test.txt`` (11,316).

    Reads the layout of the official archive (and of PML's
    ``StanfordOnlineProducts``). See :class:`ImageListDataset` for the arguments.
    """

    name = "StanfordOnlineProducts"
    layout = SOP_LAYOUT

    def read_index(self) -> Tuple[List[Path], np.ndarray]:
        base = first_existing_dir([self.root / "Stanford_Online_Products", self.root])
        paths, labels, self._file_classes = [], [], {}
        for half in ("train", "test"):
            listing = require_file(base / f"Ebay_{half}.txt", self.name, self.layout)
            half_paths, half_labels = _read_ebay_listing(listing)
            paths += [base / p for p in half_paths]
            labels += half_labels
            self._file_classes[half] = np.unique(half_labels)
        return paths, np.asarray(labels)

    def standard_classes(self, classes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return self._file_classes["train"], self._file_classes["test"]


def _read_ebay_listing(path: Path) -> Tuple[List[str], List[int]]:
    lines = path.read_text().splitlines()
    paths, labels = [], []
    # The first line is the header "image_id class_id super_class_id path".
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise DatasetLayoutError(
                f"{path}:{number}: expected 'image_id class_id super_class_id path', got {line!r}"
            )
        labels.append(int(fields[1]))
        paths.append(fields[3])
    return paths, labels

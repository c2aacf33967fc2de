"""Cars196 (Stanford Cars) from a local folder (no download)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Tuple

import numpy as np

from .image_list import DatasetLayoutError, ImageListDataset

CARS_LAYOUT = """\
either the original devkit layout
  ROOT/cars_annos.mat   (annotations: relative_im_path, class 1..196, ...)
  ROOT/car_ims/<file>.jpg
or the Kaggle "stanford-car-dataset-by-classes-folder" layout PML's Cars196 reads
  ROOT/names.csv        one class name per line (line k = class k)
  ROOT/anno_train.csv   "file,x1,y1,x2,y2,class" per line
  ROOT/anno_test.csv    same columns
  ROOT/car_data/car_data/{train,test}/<class name, '/' replaced by '-'>/<file>"""


class Cars196(ImageListDataset):
    """Stanford Cars; classes 1-98 train, 99-196 test (all images of a class,
    whatever the devkit's own train/test flag says).

    See :class:`ImageListDataset` for the arguments; reading the devkit's
    ``cars_annos.mat`` needs scipy.
    """

    name = "Cars196"
    layout = CARS_LAYOUT
    num_train_classes = 98

    def read_index(self) -> Tuple[List[Path], np.ndarray]:
        if (self.root / "cars_annos.mat").is_file():
            return self._read_devkit()
        kaggle = [self.root / n for n in ("names.csv", "anno_train.csv", "anno_test.csv")]
        if all(p.is_file() for p in kaggle):
            return self._read_kaggle()
        missing = [str(p) for p in kaggle if not p.is_file()]
        raise DatasetLayoutError(
            f"{self.name}: found neither {self.root / 'cars_annos.mat'} nor all of "
            f"names.csv/anno_train.csv/anno_test.csv in {self.root} (missing: "
            f"{', '.join(missing)}).\nExpected layout:\n{self.layout}"
        )

    def standard_classes(self, classes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return classes[classes <= self.num_train_classes], classes[classes > self.num_train_classes]

    def _read_devkit(self) -> Tuple[List[Path], np.ndarray]:
        try:
            from scipy.io import loadmat
        except ImportError as err:
            raise ImportError("Cars196 needs scipy to read cars_annos.mat: pip install scipy") from err
        mat = loadmat(str(self.root / "cars_annos.mat"), squeeze_me=True, struct_as_record=False)
        if "annotations" not in mat:
            raise DatasetLayoutError(f"{self.root / 'cars_annos.mat'} has no 'annotations' field")
        annotations = np.atleast_1d(mat["annotations"])
        paths = [self.root / str(a.relative_im_path) for a in annotations]
        labels = np.array([int(getattr(a, "class")) for a in annotations])
        return paths, labels

    def _read_kaggle(self) -> Tuple[List[Path], np.ndarray]:
        names = [line.strip() for line in (self.root / "names.csv").read_text().splitlines()]
        paths, labels = [], []
        for half in ("train", "test"):
            listing = self.root / f"anno_{half}.csv"
            with open(listing, newline="") as f:
                for number, row in enumerate(csv.reader(f), start=1):
                    if not row:
                        continue
                    label = int(row[-1])
                    if not 1 <= label <= len(names):
                        raise DatasetLayoutError(
                            f"{listing}:{number}: class {label} has no line in names.csv"
                        )
                    folder = names[label - 1].replace("/", "-")
                    paths.append(self.root / "car_data" / "car_data" / half / folder / row[0])
                    labels.append(label)
        return paths, np.asarray(labels)

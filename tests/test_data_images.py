"""CUB200 / Cars196 / StanfordOnlineProducts on tiny fake trees."""

import numpy as np
import pytest
import torch
from PIL import Image

from pml_loop.data import CUB200, Cars196, DatasetLayoutError, StanfordOnlineProducts
from pml_loop.data import transforms as T

TRAIN_CUB = list(range(1, 9))  # 8 train classes (of 1..100)
TEST_CUB = [101, 150, 200]
PER_CLASS = 2


def _write_image(path, value, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (value, value, value)).save(path, fmt)


@pytest.fixture
def cub_root(tmp_path):
    base = tmp_path / "CUB_200_2011"
    lines, labels = [], []
    image_id = 1
    for c in TRAIN_CUB + TEST_CUB:
        for k in range(PER_CLASS):
            rel = f"{c:03d}.Bird_{c}/img_{k}.jpg"
            _write_image(base / "images" / rel, c)
            lines.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            image_id += 1
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return tmp_path


def test_cub_standard_splits(cub_root):
    train = CUB200(cub_root, "train")
    test = CUB200(cub_root, "test")
    both = CUB200(cub_root, "train+test")
    assert train.classes.tolist() == TRAIN_CUB and test.classes.tolist() == TEST_CUB
    assert len(train) == len(TRAIN_CUB) * PER_CLASS and len(test) == len(TEST_CUB) * PER_CLASS
    assert len(both) == len(train) + len(test)
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    # The pixel value written is the class id: image and label line up.
    assert np.asarray(image)[0, 0, 0] == pytest.approx(label, abs=3)
    # Root may also be the CUB_200_2011 folder itself.
    assert len(CUB200(cub_root / "CUB_200_2011", "test")) == len(test)


def test_cub_folds_and_transform(cub_root):
    val = CUB200(cub_root, "val", fold=3, num_folds=4)
    train = CUB200(cub_root, "train", fold=3, num_folds=4)
    assert val.classes.tolist() == [7, 8] and train.classes.tolist() == list(range(1, 7))
    assert len(CUB200(cub_root, "train+val", fold=3)) == len(TRAIN_CUB) * PER_CLASS
    ds = CUB200(cub_root, "test", transform=T.Compose([T.Resize((4, 4)), T.ToTensor()]))
    x, y = ds[0]
    assert x.shape == (3, 4, 4) and y == 101
    with pytest.raises(ValueError, match="fold"):
        CUB200(cub_root, "val")


def test_cub_missing_and_incomplete(cub_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        CUB200(tmp_path / "nowhere", "train")
    (cub_root / "CUB_200_2011" / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="image_class_labels.txt"):
        CUB200(cub_root, "train")


@pytest.fixture
def cars_kaggle_root(tmp_path):
    names = [f"Make{c}/Model {c} 2012" for c in range(1, 197)]  # "/" must become "-"
    (tmp_path / "names.csv").write_text("\n".join(names) + "\n")
    classes = {"train": [1, 2, 50, 98, 99, 196], "test": [1, 60, 120, 196]}
    for half, cls in classes.items():
        rows = []
        for i, c in enumerate(cls):
            name = f"{half}{i:05d}.jpg"
            folder = names[c - 1].replace("/", "-")
            _write_image(tmp_path / "car_data" / "car_data" / half / folder / name, c)
            rows.append(f"{name},1,2,30,40,{c}")
        (tmp_path / f"anno_{half}.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_cars_kaggle_layout(cars_kaggle_root):
    train = Cars196(cars_kaggle_root, "train")
    test = Cars196(cars_kaggle_root, "test")
    assert train.classes.tolist() == [1, 2, 50, 60, 98] and len(train) == 6
    assert test.classes.tolist() == [99, 120, 196] and len(test) == 4
    assert all(p.is_file() for p in train.paths + test.paths)
    image, label = test[0]
    assert image.size == (6, 5) and label == 99


def test_cars_devkit_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    classes = [1, 1, 2, 97, 98, 99, 150, 196]
    records = np.zeros(len(classes), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i, c in enumerate(classes):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _write_image(tmp_path / rel, c)
        records[i] = (rel, np.array([[c]], dtype=np.uint8), np.array([[i % 2]], dtype=np.uint8))
    scipy_io.savemat(str(tmp_path / "cars_annos.mat"), {"annotations": records[None, :]})
    train = Cars196(tmp_path, "train")
    test = Cars196(tmp_path, "test")
    assert len(train) == 5 and len(test) == 3
    assert set(train.labels.tolist()) == {1, 2, 97, 98} and set(test.labels.tolist()) == {99, 150, 196}
    assert test[0][1] == 99


def test_cars_error_lists_both_layouts(tmp_path):
    (tmp_path / "names.csv").write_text("a\n")
    with pytest.raises(DatasetLayoutError, match="anno_train.csv") as err:
        Cars196(tmp_path, "train")
    assert "cars_annos.mat" in str(err.value)


@pytest.fixture
def sop_root(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    image_id = 1
    for half, classes in {"train": range(1, 9), "test": range(9, 13)}.items():
        rows = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(PER_CLASS):
                rel = f"bicycle_final/{c}_{k}.JPG"
                _write_image(base / rel, c)
                rows.append(f"{image_id} {c} 1 {rel}")
                image_id += 1
        (base / f"Ebay_{half}.txt").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_sop_splits(sop_root):
    train = StanfordOnlineProducts(sop_root, "train")
    test = StanfordOnlineProducts(sop_root, "test")
    assert train.classes.tolist() == list(range(1, 9)) and len(train) == 16
    assert test.classes.tolist() == list(range(9, 13)) and len(test) == 8
    val = StanfordOnlineProducts(sop_root, "val", fold=0)
    assert val.classes.tolist() == [1, 2]
    x, y = StanfordOnlineProducts(sop_root, "test", transform=T.ToTensor())[0]
    assert isinstance(x, torch.Tensor) and y == 9


def test_sop_incomplete(sop_root):
    (sop_root / "Stanford_Online_Products" / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="Ebay_test.txt"):
        StanfordOnlineProducts(sop_root, "train")
    assert issubclass(DatasetLayoutError, FileNotFoundError)

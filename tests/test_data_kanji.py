import numpy as np
import pytest
import torch

from pml_loop.data import KanjiGlyphs, split_faces
from pml_loop.data.kanji import downsample, shipped_glyph_path

NUM_FACES, NUM_CLASSES = 6, 40


@pytest.fixture
def glyph_root(tmp_path):
    """A synthetic glyph file: pixel values encode (face, class) for checks."""
    images = np.zeros((NUM_FACES, NUM_CLASSES, 16, 16), np.uint8)
    for f in range(NUM_FACES):
        for c in range(NUM_CLASSES):
            images[f, c, 0, 0] = f * 10
            images[f, c, 0, 1] = c
            images[f, c, 8:, 8:] = 200
    np.savez_compressed(
        tmp_path / "kanji_glyphs.npz",
        images=images,
        codepoints=np.arange(0x4E00, 0x4E00 + NUM_CLASSES, dtype=np.int32),
        face_names=np.array([f"face{f}" for f in range(NUM_FACES)]),
        font_files=np.array([f"f{f}.ttf" for f in range(NUM_FACES)]),
        packages=np.array(["pkg-a", "pkg-a", "pkg-b", "pkg-c", "pkg-c", "pkg-d"]),
        licences=np.array(["OFL-1.1"] * NUM_FACES),
    )
    return tmp_path


def _pairs(ds):
    """(face, class) encoded in the pixels of each sample."""
    raw = ds.images[:, 0, 0, :2].numpy().astype(int)
    return raw[:, 0] // 10, raw[:, 1]


def test_samples_match_labels_and_faces(glyph_root):
    ds = KanjiGlyphs(root=glyph_root, split="train", size=16)
    faces, classes = _pairs(ds)
    assert np.array_equal(classes, ds.labels) and np.array_equal(faces, ds.faces)
    assert len(ds) == len(ds.classes) * NUM_FACES
    x, y = ds[3]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y == ds.labels[3] and isinstance(y, int)
    xs, ys = ds.as_tensors()
    assert torch.equal(xs[3], x) and ys.dtype == torch.int64


def test_splits_class_disjoint_and_covering(glyph_root):
    sets = {s: set(KanjiGlyphs(root=glyph_root, split=s, fold=1).classes.tolist())
            for s in ("train", "val", "test", "train+val")}
    assert not sets["train"] & sets["val"] and not sets["train+val"] & sets["test"]
    assert sets["train"] | sets["val"] == sets["train+val"]
    assert len(sets["test"]) == NUM_CLASSES // 2
    assert sets["train+val"] | sets["test"] == set(range(NUM_CLASSES))
    vals = [set(KanjiGlyphs(root=glyph_root, split="val", fold=k).classes.tolist()) for k in range(4)]
    assert set().union(*vals) == sets["train+val"] and sum(map(len, vals)) == len(sets["train+val"])


def test_deterministic_given_seed(glyph_root):
    a = KanjiGlyphs(root=glyph_root, split="test", seed=5)
    b = KanjiGlyphs(root=glyph_root, split="test", seed=5)
    c = KanjiGlyphs(root=glyph_root, split="test", seed=6)
    assert np.array_equal(a.classes, b.classes) and torch.equal(a.images, b.images)
    assert not np.array_equal(a.classes, c.classes)


def test_num_train_classes(glyph_root):
    ds = KanjiGlyphs(root=glyph_root, split="train", num_train_classes=5)
    assert len(ds.classes) == 5 and len(ds) == 5 * NUM_FACES
    full = KanjiGlyphs(root=glyph_root, split="train")
    assert set(ds.classes) <= set(full.classes)


def test_holdout_faces_by_package(glyph_root):
    train = KanjiGlyphs(root=glyph_root, split="train", holdout_faces=0.3, seed=1)
    test = KanjiGlyphs(root=glyph_root, split="test", holdout_faces=0.3, seed=1)
    assert not set(train.faces) & set(test.faces)
    assert set(train.faces) | set(test.faces) == set(range(NUM_FACES))
    packages = test.packages
    # Whole packages move: no package has faces on both sides.
    assert not set(packages[test.face_ids]) & set(packages[train.face_ids])
    assert len(test.face_ids) >= round(0.3 * NUM_FACES)


def test_split_faces_pure_function():
    kept, held = split_faces(["a", "a", "b", "c"], 0.0)
    assert kept.tolist() == [0, 1, 2, 3] and held.tolist() == []
    kept, held = split_faces(["a", "a", "b", "c"], 0.5, seed=0)
    assert len(held) >= 2 and len(kept) >= 1
    kept, held = split_faces(["a", "a", "a"], 0.5)  # one group: nothing can go
    assert held.tolist() == []
    with pytest.raises(ValueError, match="holdout_faces"):
        split_faces(["a"], 1.0)


def test_downsample_is_an_area_average():
    x = np.zeros((1, 4, 4), np.uint8)
    x[0, :2, :2] = [[0, 100], [200, 100]]
    out = downsample(x, 2)
    assert out.dtype == np.uint8 and out[0, 0, 0] == 100 and out[0, 1, 1] == 0
    with pytest.raises(ValueError, match="larger"):
        downsample(x, 8)


def test_transform_is_applied(glyph_root):
    ds = KanjiGlyphs(root=glyph_root, split="val", transform=lambda t: t * 0 + 7, size=4)
    x, _ = ds[0]
    assert x.shape == (1, 4, 4) and torch.all(x == 7)


def test_errors_name_the_problem(tmp_path, glyph_root):
    with pytest.raises(FileNotFoundError, match="kanji_glyphs.npz"):
        KanjiGlyphs(root=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown split"):
        KanjiGlyphs(root=glyph_root, split="train+test")


def test_shipped_glyph_file():
    # package data: a missing file is a packaging bug, so this fails rather than skips
    assert shipped_glyph_path().is_file(), shipped_glyph_path()
    ds = KanjiGlyphs(split="train", num_train_classes=100, size=16)
    assert len(ds.classes) == 100 and len(ds.face_ids) >= 30
    assert ds.images.shape[1:] == (1, 16, 16)
    assert len(ds.codepoints) >= 1000
    assert all(0x4E00 <= cp <= 0x9FFF for cp in ds.codepoints)
    assert all(ds.licences) and all(ds.packages)
    assert shipped_glyph_path().stat().st_size <= 20_000_000

import numpy as np
import pytest

from pml_loop.data.splits import fixed_split_classes, fold_classes, select_split, split_classes


def test_fold_classes_partition_and_rotate():
    classes = np.arange(10, 30)
    vals = []
    for fold in range(4):
        train, val = fold_classes(classes, fold, 4)
        assert len(np.intersect1d(train, val)) == 0
        assert sorted(np.concatenate([train, val]).tolist()) == classes.tolist()
        vals.append(val)
    # The four val chunks tile the classes exactly once.
    assert sorted(np.concatenate(vals).tolist()) == classes.tolist()


def test_fold_classes_rejects_bad_fold():
    with pytest.raises(ValueError, match="fold"):
        fold_classes(np.arange(8), 4, 4)
    with pytest.raises(ValueError, match="folds from only"):
        fold_classes(np.arange(3), 0, 4)


@pytest.mark.parametrize("seed", [0, 1, None])
def test_split_classes_disjoint_and_covering(seed):
    splits = split_classes(range(100), seed=seed, fold=2, num_folds=4)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert len(test) == 50 and len(val) + len(train) == 50
    for a, b in [(train, val), (train, test), (val, test)]:
        assert len(np.intersect1d(a, b)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(100))
    assert np.array_equal(splits["train+val"], np.sort(np.concatenate([train, val])))


def test_split_classes_deterministic_and_seed_dependent():
    a = split_classes(range(200), seed=3)
    b = split_classes(range(200), seed=3)
    c = split_classes(range(200), seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_unshuffled_split_is_the_standard_halves():
    splits = split_classes(range(1, 201), seed=None)
    assert splits["test"].tolist() == list(range(101, 201))


def test_num_train_classes_caps_and_nests():
    full = split_classes(range(400), seed=0)
    small = split_classes(range(400), seed=0, num_train_classes=20)
    bigger = split_classes(range(400), seed=0, num_train_classes=50)
    assert len(small["train"]) == 20
    assert set(small["train"]) <= set(bigger["train"]) <= set(full["train"])
    assert np.array_equal(small["test"], full["test"])
    assert np.array_equal(small["val"], full["val"])
    with pytest.raises(ValueError, match="num_train_classes"):
        split_classes(range(40), num_train_classes=1000)


def test_fixed_split_classes():
    standard = fixed_split_classes(range(1, 9), range(9, 13))
    assert standard["train"].tolist() == list(range(1, 9)) and len(standard["val"]) == 0
    folded = fixed_split_classes(range(1, 9), range(9, 13), fold=1, num_folds=4)
    assert folded["val"].tolist() == [3, 4]
    assert folded["test"].tolist() == [9, 10, 11, 12]
    with pytest.raises(ValueError, match="overlap"):
        fixed_split_classes([1, 2], [2, 3])


def test_select_split_names_valid_choices():
    with pytest.raises(ValueError, match="unknown split 'tset'"):
        select_split(split_classes(range(10), num_folds=1), "tset")

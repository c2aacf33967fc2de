"""Class-disjoint splits: a held-out test half and K train/val folds.

The scheme is powerful-benchmarker's: the test classes are never used to
choose anything, and the remaining classes are cut into ``num_folds``
contiguous chunks; fold ``k`` validates on chunk ``k`` and trains on the
others. Everything here is a pure function of its arguments, so a split can be
exported, compared and reproduced without building a dataset.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

#: Split names the datasets of this package understand.
SPLIT_NAMES = ("train", "val", "test", "train+val", "train+test")


def fold_classes(
    classes: Sequence[int], fold: int, num_folds: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Cut ``classes`` (kept in the given order) into a train and a val part.

    Val is the ``fold``-th of ``num_folds`` contiguous chunks (sizes differ
    by at most one, as with ``np.array_split``); train is everything else.
    With ``num_folds == 1`` val is empty and train is every class.

    Returns:
        ``(train, val)``: two 1-D int arrays, disjoint, covering ``classes``.
    """
    classes = np.asarray(classes, dtype=np.int64)
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    if num_folds == 1:
        return classes.copy(), classes[:0].copy()
    if len(classes) < num_folds:
        raise ValueError(
            f"cannot make {num_folds} folds from only {len(classes)} classes"
        )
    chunks = np.array_split(classes, num_folds)
    val = chunks[fold]
    train = np.concatenate([c for i, c in enumerate(chunks) if i != fold])
    return train, val


def split_classes(
    classes: Iterable[int],
    *,
    seed: Optional[int] = 0,
    fold: int = 0,
    num_folds: int = 4,
    test_fraction: float = 0.5,
    num_train_classes: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Split a set of class ids into class-disjoint train / val / test sets.

    Args:
        classes: class ids (duplicates are ignored).
        seed: the sorted classes are shuffled with ``numpy.random.default_rng
            (seed)`` first; ``None`` keeps the sorted order (the standard
            "test = second half of the sorted classes").
        fold, num_folds: which train/val fold of the non-test classes.
        test_fraction: share of the classes that goes to test (the last
            ones of the (shuffled) order).
        num_train_classes: keep only the first this-many train classes of the
            fold (to leave headroom in a benchmark); ``None`` keeps them all.

    Returns:
        dict with keys ``"train"``, ``"val"``, ``"test"``, ``"train+val"``
        (= train | val, after the cap) and ``"train+test"``; each a sorted
        1-D int64 array.
    """
    order = np.unique(np.asarray(list(classes), dtype=np.int64))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(order)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    num_test = int(round(len(order) * test_fraction))
    trainval, test = order[: len(order) - num_test], order[len(order) - num_test :]
    train, val = fold_classes(trainval, fold, num_folds)
    return _named_splits(train, val, test, num_train_classes)


def fixed_split_classes(
    train_classes: Sequence[int],
    test_classes: Sequence[int],
    *,
    fold: Optional[int] = None,
    num_folds: int = 4,
) -> Dict[str, np.ndarray]:
    """Splits for a dataset whose train/test classes are fixed by convention.

    ``fold=None`` gives the standard split: ``"train"`` is every train class
    and ``"val"`` is empty. With a fold, the *sorted* train classes are cut as
    in :func:`fold_classes` (no shuffling, as in powerful-benchmarker).

    Returns:
        the same dict as :func:`split_classes`.
    """
    trainval = np.unique(np.asarray(train_classes, dtype=np.int64))
    test = np.unique(np.asarray(test_classes, dtype=np.int64))
    overlap = np.intersect1d(trainval, test)
    if len(overlap):
        raise ValueError(f"train and test classes overlap: {overlap[:10].tolist()}")
    if fold is None:
        train, val = trainval, trainval[:0]
    else:
        train, val = fold_classes(trainval, fold, num_folds)
    return _named_splits(train, val, test, None)


def select_split(splits: Dict[str, np.ndarray], split: str) -> np.ndarray:
    """``splits[split]`` with an error that lists the valid names."""
    if split not in splits:
        raise ValueError(
            f"unknown split {split!r}; expected one of {sorted(splits)}"
        )
    return splits[split]


def _named_splits(
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    num_train_classes: Optional[int],
) -> Dict[str, np.ndarray]:
    if num_train_classes is not None:
        if num_train_classes < 1:
            raise ValueError(f"num_train_classes must be >= 1, got {num_train_classes}")
        if num_train_classes > len(train):
            raise ValueError(
                f"num_train_classes={num_train_classes} but the fold has only "
                f"{len(train)} train classes"
            )
        # Capping takes a prefix of the (shuffled) order, so a smaller cap
        # always gives a subset of a larger one.
        train = train[:num_train_classes]
    train, val, test = np.sort(train), np.sort(val), np.sort(test)
    return {
        "train": train,
        "val": val,
        "test": test,
        "train+val": np.sort(np.concatenate([train, val])),
        "train+test": np.sort(np.concatenate([train, val, test])),
    }

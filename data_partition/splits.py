"""Subject-wise splits: the paper's seeded split, other seeds, leave-one-subject-out folds.

One federated client = one training subject; partition id ``i`` maps to ``split.train[i]``.
Lists are returned **sorted** (not in shuffle order) so the mapping does not depend on how the split
was drawn; :func:`shuffle_order` gives the paper's shuffle order when it is needed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .constants import SUBJECTS


@dataclass(frozen=True)
class Split:
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            object.__setattr__(self, name, tuple(sorted(int(s) for s in getattr(self, name))))
        seen = set(self.train)
        for part in (self.val, self.test):
            if seen & set(part):
                raise ValueError(f"split parts overlap: {sorted(seen & set(part))}")
            seen |= set(part)

    @property
    def num_partitions(self) -> int:
        """Federated clients = training subjects."""
        return len(self.train)

    def partition_subject(self, partition_id: int) -> int:
        """Subject of federated partition ``partition_id`` (``split.train[partition_id]``)."""
        if not 0 <= int(partition_id) < len(self.train):
            raise IndexError(f"partition id {partition_id} outside 0..{len(self.train) - 1}")
        return self.train[int(partition_id)]

    def to_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


def shuffle_order(seed: int = 42, subjects=SUBJECTS, rng: random.Random | None = None) -> tuple[int, ...]:
    """``random.seed(seed); random.shuffle(subjects)`` without touching the global RNG. With ``rng`` (a
    ``random.Random(seed)`` the caller keeps drawing from, as the paper's client sampling does) the shuffle
    consumes that generator instead."""
    order = list(subjects)
    (rng or random.Random(seed)).shuffle(order)
    return tuple(order)


def paper_split(seed: int = 42, n_train: int = 21, n_val: int = 3, subjects=SUBJECTS) -> Split:
    """The Time-MAGNET split: shuffle with ``seed``; first ``n_train`` train, next ``n_val`` val, rest test.

    With the defaults: train 02 03 06 07 10 11 12 13 14 15 16 17 18 19 20 22 23 26 27 28 30,
    val 05 25 29, test 01 04 08 09 21 24. Other seeds give other random subject splits.
    """
    order = shuffle_order(seed, subjects)
    if n_train + n_val >= len(order) or n_train < 1 or n_val < 0:
        raise ValueError(f"cannot split {len(order)} subjects into {n_train} train / {n_val} val / rest test")
    return Split(train=order[:n_train], val=order[n_train : n_train + n_val], test=order[n_train + n_val :])


def loso_folds(subjects=SUBJECTS, n_val: int = 3, seed: int = 42) -> list[Split]:
    """Leave-one-subject-out: fold ``k`` tests on ``subjects[k]``; ``n_val`` of the others (seeded,
    per fold) validate; the rest train."""
    subjects = tuple(sorted(int(s) for s in subjects))
    folds = []
    for k, s in enumerate(subjects):
        rest = [x for x in subjects if x != s]
        random.Random(seed * 1000 + k).shuffle(rest)
        if n_val >= len(rest):
            raise ValueError(f"n_val={n_val} leaves no training subject")
        folds.append(Split(train=tuple(rest[n_val:]), val=tuple(rest[:n_val]), test=(s,)))
    return folds

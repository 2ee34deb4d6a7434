"""One client's windows as its strategy and the run's scenario split them: held-out windows (never trained on),
labelled training windows, and the training windows whose label is withheld (label-scarce scenario)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from model.training import UNLABELLED
from fedtime import task
from fedtime.config import RunConfig


class WithoutLabels(Dataset):
    """``base``'s windows with the label of those at ``hidden`` positions replaced by ``UNLABELLED`` (-1): the
    cross-entropy skips them, unsupervised losses (FedEPA's alignment) still see them."""

    def __init__(self, base: Dataset, hidden: np.ndarray):
        self.base, self.hidden = base, set(int(i) for i in hidden)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        if int(i) in self.hidden:
            item = dict(item, y=torch.tensor(UNLABELLED, dtype=torch.int64))
        return item


@dataclass
class LocalData:
    train: Dataset               # what local training iterates: the labelled windows (+ unlabelled ones, label -1)
    labels: np.ndarray           # labels of the labelled training windows (class weights)
    heldout: Dataset | None      # held-out windows as the client has them, without training noise
    present: np.ndarray          # training windows that have each modality (MODALITIES order)
    num_labelled: int
    num_unlabelled: int


def holdout_fraction(cfg: RunConfig, round_config: dict) -> float:
    """The share of a client's windows held out: `personal-eval-fraction` when set (then every strategy's held-out
    set is the personalized evaluation's), else what the strategy asks for (`local-val-fraction`)."""
    return cfg.personal_eval_fraction or float(round_config.get("local-val-fraction", 0.0))


def local_data(cfg: RunConfig, subject: int, heldout: float, *, keep_unlabelled: bool = False) -> LocalData:
    """The subject's windows: a seeded share ``heldout`` set apart (by (seed, subject): the same windows every
    round), then of the rest only `labeled-fraction` keep their label (`Scenario.labelled`). The unlabelled
    ones are dropped, or kept with label -1 when ``keep_unlabelled``."""
    data = task.dataset(cfg, [subject], train=True)
    n = len(data)
    train_idx, held = np.arange(n), None
    if heldout > 0:
        order = np.random.default_rng([cfg.seed, subject]).permutation(n)
        k = max(1, int(round(heldout * n)))
        held_idx, train_idx = np.sort(order[:k]), np.sort(order[k:])
        held = Subset(task.dataset(cfg.replace(augment_sigma=0.0), [subject], train=True), held_idx.tolist())
    labelled = task.scenario(cfg).labelled(subject, len(train_idx))
    kept = train_idx if keep_unlabelled else train_idx[labelled]
    if len(kept) == n:
        train: Dataset = data
    else:
        train = Subset(data, kept.tolist())
    if keep_unlabelled and not labelled.all():
        train = WithoutLabels(train, np.flatnonzero(~labelled))
    return LocalData(train=train, labels=data.labels[train_idx[labelled]], heldout=held,
                     present=data.masks[kept].sum(axis=0), num_labelled=int(labelled.sum()),
                     num_unlabelled=int((~labelled).sum()) if keep_unlabelled else 0)

"""Messy-federation scenarios from the run config: missing modalities, poisoned clients and scarce labels.

Every party derives the same scenario from (run config, split) alone, so a ClientApp knows whether its subject
lacks a sensor or is poisoned without any extra message, and the server can record who was. Masks come from
`data_partition.simulate` (absent modalities stay in the batch as zeros with mask False).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_partition.constants import MODALITIES
from data_partition.simulate import drop_modalities, flip_labels, full_masks, sample_missing_masks, select_clients
from fedtime.config import RunConfig


@dataclass(frozen=True)
class Scenario:
    missing_rate: float
    missing_at_eval: bool
    absent_modalities: tuple[str, ...]
    absent_subjects: tuple[int, ...]
    poison: str
    poisoned_subjects: tuple[int, ...]
    poison_scale: float
    seed: int
    labeled_fraction: float = 1.0

    @classmethod
    def from_config(cls, cfg: RunConfig, train_subjects) -> "Scenario":
        train = sorted(int(s) for s in train_subjects)
        absent = select_clients(train, cfg.absent_fraction, seed=cfg.seed) if cfg.absent_modality_list else ()
        poisoned: tuple[int, ...] = ()
        if cfg.poison != "none":
            if cfg.poison_clients > len(train):
                raise ValueError(f"poison-clients={cfg.poison_clients} exceeds the {len(train)} training subjects")
            rng = np.random.default_rng([cfg.seed, 7])
            poisoned = tuple(sorted(int(s) for s in rng.choice(train, size=cfg.poison_clients, replace=False)))
        return cls(cfg.missing_rate, cfg.missing_at_eval, cfg.absent_modality_list, absent, cfg.poison, poisoned,
                   cfg.poison_scale, cfg.seed, cfg.labeled_fraction)

    @property
    def active(self) -> bool:
        return bool(self.missing_rate or self.absent_subjects or self.poisoned_subjects)

    def masks(self, subject: int, n: int, *, train: bool) -> np.ndarray:
        """Presence mask ``bool [n, 4]`` of a subject's windows (training windows or evaluation ones)."""
        m = full_masks(n)
        if self.missing_rate > 0 and (train or self.missing_at_eval):
            rates = {mod: self.missing_rate for mod in MODALITIES}
            m = sample_missing_masks(n, rates, seed=self.seed * 100_003 + subject * 2 + (0 if train else 1))
        if train and subject in self.absent_subjects:
            m = m.copy()
            kept = [j for j, mod in enumerate(MODALITIES) if mod not in self.absent_modalities]
            m[~m[:, kept].any(axis=1), kept[0]] = True  # a window would be left empty: keep a sensor it has
            m = drop_modalities(m, self.absent_modalities)
        return m

    def labels(self, subject: int, y: np.ndarray) -> np.ndarray:
        return flip_labels(y) if self.poison == "label-flip" and subject in self.poisoned_subjects else y

    def labelled(self, subject: int, n: int) -> np.ndarray:
        """Which of a client's ``n`` training windows keep their label (``bool [n]``): exactly
        ``max(1, round(labeled_fraction * n))`` of them, drawn with (seed, subject); all with fraction 1."""
        keep = np.ones(int(n), dtype=bool)
        if self.labeled_fraction >= 1.0 or n == 0:
            return keep
        k = max(1, int(round(self.labeled_fraction * n)))
        keep[:] = False
        keep[np.random.default_rng([self.seed, subject, 11]).permutation(int(n))[:k]] = True
        return keep

    def poison_update(self, subject: int, new: dict[str, torch.Tensor], old: dict) -> dict[str, torch.Tensor]:
        """A 'scale' attacker sends global + s·(local − global) instead of its local model."""
        if self.poison != "scale" or subject not in self.poisoned_subjects:
            return new
        out = {}
        for k, v in new.items():
            g = torch.as_tensor(old[k]).to(v.dtype)
            out[k] = g + self.poison_scale * (v - g) if v.is_floating_point() else v
        return out

    def describe(self) -> dict:
        return {"missing_rate": self.missing_rate, "missing_at_eval": self.missing_at_eval,
                "absent_modalities": list(self.absent_modalities), "absent_subjects": list(self.absent_subjects),
                "poison": self.poison, "poisoned_subjects": list(self.poisoned_subjects),
                "poison_scale": self.poison_scale, "labeled_fraction": self.labeled_fraction}

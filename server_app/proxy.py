"""The server-held proxy set on which FedMobile-style aggregation scores the clients' latent generators.

A seeded sample of validation windows with every modality present: their real embeddings under the newly
aggregated encoders (each subject's with its own BatchNorm statistics, as at evaluation) are the targets; a
generator's value is the R² with which it reconstructs each modality from a random subset of the others.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from model import load_trainable_state
from model.training import each_subject
from server_app import task
from server_app.config import RunConfig

GEN_PREFIX = "generators."


class GeneratorProxy:
    def __init__(self, cfg: RunConfig, subjects, size: int, seed: int = 0, cluster_windows: int = 64) -> None:
        complete = cfg.replace(missing_at_eval=False, missing_rate=0.0)
        rng = np.random.default_rng([seed, 11])
        per_subject = max(1, size // max(len(subjects), 1))
        self.subject_loaders, self.proxy_loaders, n = {}, {}, 0
        for s in subjects:  # the same number of windows from every subject, embedded with its own statistics
            data = task.dataset(complete, [int(s)], train=False)
            idx = np.sort(rng.choice(len(data), size=min(per_subject, len(data)), replace=False))
            self.subject_loaders[int(s)] = DataLoader(data, batch_size=cfg.eval_batch_size)
            self.proxy_loaders[int(s)] = DataLoader(Subset(data, idx.tolist()), batch_size=cfg.eval_batch_size)
            n += len(idx)
        self.adapt_bn = cfg.eval_bn_stats == "subject"
        self.cluster_windows = cluster_windows
        self.model = task.model_for(cfg)
        if self.model.generators is None:
            raise ValueError("GeneratorProxy needs a model with latent generators (strategy 'fedmobile')")
        self.generators = copy.deepcopy(self.model.generators).eval()
        m = len(self.model.modalities)
        g = torch.Generator().manual_seed(seed)
        self.inputs = torch.rand(n, m, generator=g) >= 0.5  # which other modalities each target sees
        self.embeddings: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, global_state: dict) -> None:
        """Real embeddings [N, M, d] of the proxy windows under the aggregated encoders, each subject's with its
        own BatchNorm statistics when the run evaluates that way (as the generators will be used)."""
        load_trainable_state(self.model, {k: torch.as_tensor(v) for k, v in global_state.items()})
        was = self.model.training
        self.model.eval()
        parts = []
        for s in each_subject(self.model, self.subject_loaders, "cpu", adapt_bn=self.adapt_bn):
            parts += [self.model.embed(batch)[0].float().cpu() for batch in self.proxy_loaders[s]]
        self.model.train(was)
        self.embeddings = torch.cat(parts)

    @torch.no_grad()
    def _generate(self, gen_state: dict, rows: slice = slice(None)) -> list[torch.Tensor]:
        if self.embeddings is None:
            raise RuntimeError("call prepare() with the aggregated state first")
        sd = {k[len(GEN_PREFIX):]: torch.as_tensor(v) for k, v in gen_state.items()}
        self.generators.load_state_dict(sd, strict=True)
        e = self.embeddings[rows]
        out = []
        everything = torch.ones_like(self.inputs[rows])
        for j in range(e.shape[1]):
            avail = self.generators.inputs_for(self.inputs[rows], everything, j)
            out.append(self.generators.generate(e, avail, j))
        return out

    def outputs(self, gen_state: dict) -> np.ndarray:
        """A generator's outputs on the first proxy windows, flattened (what clustering compares)."""
        return torch.stack(self._generate(gen_state, slice(0, self.cluster_windows)), 1).flatten().numpy()

    def modality_r2(self, gen_state: dict) -> list[float]:
        """Per modality, the R² with which the generators reconstruct its proxy embeddings: 1 − MSE_j / Var_j
        (predicting the modality's mean scores 0)."""
        e = self.embeddings
        preds = self._generate(gen_state)
        return [1.0 - float(((p - e[:, j]) ** 2).mean() / e[:, j].var(0).mean().clamp_min(1e-12))
                for j, p in enumerate(preds)]

    def value(self, gen_state: dict) -> float:
        """A coalition's value: the mean over modalities of :meth:`modality_r2` (0 for the mean predictor, the
        value of the empty coalition)."""
        return float(np.mean(self.modality_r2(gen_state)))

"""The server-held proxy set on which FedMobile-style aggregation scores the clients' latent generators.

A seeded sample of validation windows with every modality present: their real embeddings under the newly
aggregated encoders (each subject's with its own BatchNorm statistics, as at evaluation) are the targets; a
generator's value is the R² with which it reconstructs each modality from a random subset of the others, or, for
generators distilled towards the prediction (`fedmobile.generator-objective = "prediction"`), how much the generated node
lowers the fused prediction's cross-entropy against leaving the modality out.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from model import load_trainable_state
from model.training import each_subject
from fedtime import task
from fedtime.config import RunConfig

GEN_PREFIX = "generators."


class GeneratorProxy:
    def __init__(self, cfg: RunConfig, model_options: dict, subjects, size: int, seed: int = 0,
                 cluster_windows: int = 64) -> None:
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
        self.model = task.model_for(cfg, model_options)
        if self.model.generators is None:
            raise ValueError("GeneratorProxy needs a model with latent generators (strategy 'fedmobile')")
        self.generators = copy.deepcopy(self.model.generators).eval()
        self.objective = self.model.cfg.generator_objective
        # the prediction gate runs fusion + classifier on the proxy embeddings: a copy with the aggregated weights
        # and, for each subject, that subject's own BatchNorm statistics, as evaluation has them
        self.head = copy.deepcopy(torch.nn.ModuleDict({"fusion": self.model.fusion,
                                                       "classifier": self.model.classifier})).eval()
        self.head_states: dict[int, dict] = {}
        self.rows: dict[int, slice] = {}
        m = len(self.model.modalities)
        g = torch.Generator().manual_seed(seed)
        self.inputs = torch.rand(n, m, generator=g) >= 0.5  # which other modalities each target sees
        everything = torch.ones_like(self.inputs)
        self.target_inputs = [self.generators.inputs_for(self.inputs, everything, j) for j in range(m)]
        self.embeddings: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, global_state: dict) -> None:
        """Real embeddings [N, M, d] of the proxy windows under the aggregated encoders, each subject's with its
        own BatchNorm statistics when the run evaluates that way (as the generators will be used)."""
        load_trainable_state(self.model, {k: torch.as_tensor(v) for k, v in global_state.items()})
        was = self.model.training
        self.model.eval()
        parts, labels, start = [], [], 0
        for s in each_subject(self.model, self.subject_loaders, "cpu", adapt_bn=self.adapt_bn):
            batches = list(self.proxy_loaders[s])
            parts += [self.model.embed(batch)[0].float().cpu() for batch in batches]
            labels += [batch["y"].long().cpu() for batch in batches]
            n = sum(len(b["y"]) for b in batches)
            self.rows[s], start = slice(start, start + n), start + n
            self.head_states[s] = {f"{part}.{k}": v.detach().clone()
                                   for part in ("fusion", "classifier")
                                   for k, v in getattr(self.model, part).named_buffers()}
        self.model.train(was)
        self.head.load_state_dict({f"{part}.{k}": v for part in ("fusion", "classifier")
                                   for k, v in getattr(self.model, part).state_dict().items()})
        self.embeddings = torch.cat(parts)
        self.labels = torch.cat(labels)
        self._left_out: list[torch.Tensor] | None = None

    @torch.no_grad()
    def _generate(self, gen_state: dict, rows: slice = slice(None)) -> list[torch.Tensor]:
        if self.embeddings is None:
            raise RuntimeError("call prepare() with the aggregated state first")
        sd = {k[len(GEN_PREFIX):]: torch.as_tensor(v) for k, v in gen_state.items()}
        self.generators.load_state_dict(sd, strict=True)
        e = self.embeddings[rows]
        return [self.generators.generate(e, avail[rows], j) for j, avail in enumerate(self.target_inputs)]

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

    @torch.no_grad()
    def _head_loss(self, e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the fused prediction per proxy window, each subject's with its own statistics."""
        out = torch.empty(len(e))
        for s, rows in self.rows.items():
            for name, buf in self.head.named_buffers():
                buf.copy_(self.head_states[s][name])
            feats, _ = self.head["fusion"](e[rows], present[rows])
            out[rows] = F.cross_entropy(self.head["classifier"](feats).float(), self.labels[rows], reduction="none")
        return out

    def modality_gain(self, gen_state: dict) -> list[float]:
        """Per modality j, the mean cross-entropy (nats) of the fused prediction from the proxy windows' other
        inputs with j left out, minus with j generated from them: > 0 when the generated node helps."""
        e = self.embeddings
        if self._left_out is None:  # does not depend on the generators: once per prepare()
            self._left_out = [self._head_loss(e, a) for a in self.target_inputs]
        gains = []
        for j, generated in enumerate(self._generate(gen_state)):
            filled, seen = e.clone(), self.target_inputs[j].clone()
            filled[:, j], seen[:, j] = generated, True
            gains.append(float((self._left_out[j] - self._head_loss(filled, seen)).mean()))
        return gains

    def quality(self, gen_state: dict) -> list[float]:
        """What the gate of the generated nodes reads, per modality: :meth:`modality_r2`, or :meth:`modality_gain`
        for generators distilled towards the prediction."""
        return self.modality_gain(gen_state) if self.objective == "prediction" else self.modality_r2(gen_state)

    def value(self, gen_state: dict) -> float:
        """A coalition's value: the mean over modalities of :meth:`quality` (the empty coalition's is 0)."""
        return float(np.mean(self.quality(gen_state)))

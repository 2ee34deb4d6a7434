"""User-level differential privacy on the server (docs/privacy.md): the DP-FedAvg aggregate of clipped updates,
the Gaussian noise, the check that a reply was clipped, and the accountant.

Mechanism (McMahan et al., ICLR 2018, "DP-FedAvg", fixed denominator): with m = clients-per-round sampled without
replacement from the N connected training subjects, each client's update clipped to L2 norm C,

    new global = global + (Σ clipped updates + N(0, (z·C)² I)) / m

a failed or refused client counting as a zero update. The *uniform* mean over the m sampled clients, not the
sample-weighted one: a weight a client's own data sets would let that client's influence grow past C/m. The noise is
added by the server (`dp-noise = "server"`), or each client adds N(0, (z·C)²/m) to its clipped update
(`"client"`) and the server adds the shares of the clients that did not answer, so the sum carries the same noise.

Accounting: Flower's `RdpAccountant` (a wrapper of Google's `dp-accounting` RDP accountant) with sampling without
replacement of m of N and the replace-one-user neighbouring relation, i.e. dp-accounting's
`SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))` composed over the rounds: the library's noise
multiplier is the noise's standard deviation over the sum's L2 sensitivity, and replacing one user moves a sum of
updates clipped to C by up to 2C.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from fedtime.config import RunConfig
from fedtime.privacy import CLIP_TOLERANCE, is_floating, l2_norm, noise_rng, update

NEIGHBOURING = "replace-one"
SAMPLING = "without-replacement"


def is_variance(key: str) -> bool:
    """A variance buffer (BatchNorm's running_var, the generators' var): kept ≥ 0 after the noise."""
    last = key.rsplit(".", 1)[-1]
    return last in ("running_var", "var")


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, clients: int, population: int, rounds: int, delta: float) -> float:
    """ε(δ) after `rounds` rounds of the Gaussian mechanism with noise multiplier z (noise std over the clip norm)
    on `clients` users sampled without replacement from `population`, replace-one-user neighbouring relation."""
    if rounds <= 0:
        return 0.0
    from flwr.serverapp import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant,
                                SamplingMethod)

    acc = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                      neighboring_relation=NeighboringRelation(NEIGHBOURING),
                                      sampling_method=SamplingMethod(SAMPLING)))
    # replace-one: one user changes the sum of clipped updates by up to 2C, so the library's multiplier is z / 2
    acc.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier / 2, sample_size=clients,
                                     population_size=population), count=rounds)
    return float(acc.get_epsilon(delta))


@dataclass
class UserLevelDP:
    """A run's DP settings (the run config's privacy section) and what the server does with them."""

    noise_multiplier: float
    clip: float
    noise: str  # "server" | "client": who adds the Gaussian noise
    delta: float
    target_epsilon: float  # 0: no budget
    clients: int  # m = clients-per-round
    population: int | None = None  # N: the connected training subjects the sampler draws from (after discovery)
    rng: np.random.Generator = field(default_factory=noise_rng, repr=False)  # OS-seeded; tests set a seeded one

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "UserLevelDP | None":
        """The run's DP, or None when `dp-noise-multiplier` is 0 (DP off)."""
        if not cfg.dp_noise_multiplier > 0:
            return None
        return cls(cfg.dp_noise_multiplier, cfg.dp_clip, cfg.dp_noise, cfg.dp_delta, cfg.dp_target_epsilon,
                   cfg.clients_per_round)

    # ----- what the clients receive
    @property
    def client_noise_std(self) -> float:
        """Each client's share of the noise with `dp-noise = "client"`: m shares sum to N(0, (z·C)²)."""
        return self.noise_multiplier * self.clip / math.sqrt(self.clients) if self.noise == "client" else 0.0

    def round_config(self) -> dict[str, float]:
        """Added to every round's train config: the client clips to `dp-clip` and adds `dp-noise-std` (0: none)."""
        return {"dp-clip": float(self.clip), "dp-noise-std": float(self.client_noise_std)}

    # ----- replies and aggregation
    def refuse(self, state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> str | None:
        """Why a reply cannot enter the aggregate, or None. With noise at the server the update must come clipped:
        one that is not was not made by this project's client (or by a client that ignores `dp-clip`), and is
        refused as a failure rather than silently clipped. With noise at the clients their share hides the norm: the
        server cannot check it and relies on the clients' clipping (docs/privacy.md)."""
        try:
            upd = update(state, global_state)
        except ValueError as err:
            return str(err)
        if self.noise == "client":
            return None
        norm = l2_norm(upd)
        if norm > self.clip * (1 + CLIP_TOLERANCE):
            return f"update norm {norm:.6g} exceeds dp-clip={self.clip:g}: not clipped"
        return None

    def mean(self, states: Sequence[Mapping[str, np.ndarray]], global_state: Mapping[str, np.ndarray],
             keys: Sequence[str]) -> dict[str, np.ndarray]:
        """global + (Σ updates + noise) / m over `keys`: an array a reply lacks is a zero update, integer arrays
        keep the global value, variances are kept ≥ 0 (post-processing, free under DP)."""
        m = self.clients
        missing = max(m - len(states), 0)
        if self.noise == "server":
            std = self.noise_multiplier * self.clip
        else:  # the clients' shares are in their updates; the server adds the shares of those that did not answer
            std = self.noise_multiplier * self.clip * math.sqrt(missing / m)
        out = {}
        for k in keys:
            g = np.asarray(global_state[k])
            if not is_floating(g):
                out[k] = g.copy()
                continue
            acc = np.zeros(g.shape, np.float64)
            for s in states:
                if k in s:
                    acc += np.asarray(s[k], np.float64) - g.astype(np.float64)
            if std > 0:
                acc += self.rng.normal(0.0, std, g.shape)
            new = g.astype(np.float64) + acc / m
            if is_variance(k):
                new = np.maximum(new, 0.0)
            out[k] = new.astype(g.dtype)
        return out

    # ----- accounting
    def epsilon(self, rounds: int) -> float:
        if self.population is None:
            raise RuntimeError("the accountant needs the population: discover the clients first")
        return epsilon(self.noise_multiplier, self.clients, self.population, rounds, self.delta)

    def record(self, rounds_done: int) -> dict[str, Any]:
        """results.json's `privacy` block after `rounds_done` rounds (ε recomputed from the round count)."""
        return {"mechanism": f"gaussian, user-level, noise at {self.noise}",
                "clip": self.clip, "noise_multiplier": self.noise_multiplier,
                "noise_std_of_mean": self.noise_multiplier * self.clip / self.clients,
                "sampling": {"clients_per_round": self.clients, "num_clients": self.population,
                             "method": SAMPLING, "sampler": "os-entropy"},
                "neighbouring": NEIGHBOURING, "accountant": "rdp (flwr.serverapp.RdpAccountant, dp-accounting)",
                "delta": self.delta, "epsilon": [self.epsilon(r) for r in range(1, rounds_done + 1)],
                "target_epsilon": self.target_epsilon, "stopped": None}

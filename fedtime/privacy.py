"""User-level differential privacy, the part both parties compute (numpy only; docs/privacy.md).

A client's *update* is what it sends minus the round's global state, over every floating array it sends (trainable
parameters and BatchNorm running statistics, which are data-dependent too). Under DP a client clips that update to
L2 norm `dp-clip` before sending (`privatize`), like Flower's `fixedclipping_mod`, and with `dp-noise = "client"`
adds its share of the Gaussian noise. The server measures the same norm with the same function (`l2_norm`), so its
check of a clipped reply (server_app/privacy.py) sees bit for bit what the client saw.

Noise is drawn from a generator seeded by the operating system, never from the run's `seed`: that seed is written in
results.json, and noise anyone can regenerate can be subtracted.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

#: A reply's update may exceed `dp-clip` by this relative margin (float rounding) before the server refuses it.
CLIP_TOLERANCE = 1e-6


def is_floating(a: np.ndarray) -> bool:
    return bool(np.issubdtype(np.asarray(a).dtype, np.floating))


def update(state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state − global_state` in float64 over the floating arrays `state` carries (an array a client does not send,
    FedMFS's unchosen encoders, is a zero update and adds nothing to the norm). Integer arrays are not an update:
    under DP they keep the global value (server_app/privacy.py)."""
    unknown = [k for k in state if k not in global_state]
    if unknown:
        raise ValueError(f"arrays the global model does not have: {unknown[:3]}")
    return {k: np.asarray(v, np.float64) - np.asarray(global_state[k], np.float64)
            for k, v in state.items() if is_floating(v)}


def l2_norm(upd: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all arrays together (one vector), accumulated in float64 in key order."""
    return math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in upd.values()))


def clip(upd: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """(the update scaled to L2 norm ≤ `clip_norm`, the scale used); an update already inside is unchanged."""
    if not clip_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    norm = l2_norm(upd)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return ({k: v * scale for k, v in upd.items()} if scale != 1.0 else dict(upd)), scale


def noise_rng(rng: np.random.Generator | None = None) -> np.random.Generator:
    """`rng`, or a fresh generator seeded by the operating system (tests pass a seeded one)."""
    return rng if rng is not None else np.random.default_rng()


def privatize(state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray], clip_norm: float,
              noise_std: float = 0.0, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """What a client sends under DP: global + clip(state − global), plus N(0, noise_std²) on every coordinate when
    it adds its share of the noise (`dp-noise = "client"`), each array cast back to its dtype; integer arrays as the
    global ones. Without noise the update *as sent* (after the cast) has norm ≤ `clip_norm`: rounding a float32 sum
    can push it a hair above, so the step is shrunk until the server's own measurement passes."""
    upd, _ = clip(update(state, global_state), clip_norm)
    g64 = {k: np.asarray(global_state[k], np.float64) for k in upd}
    dtypes = {k: np.asarray(state[k]).dtype for k in upd}
    if noise_std > 0:
        gen = noise_rng(rng)
        upd = {k: v + gen.normal(0.0, noise_std, v.shape) for k, v in upd.items()}
    out = {k: np.asarray(global_state[k]).copy() for k in state if k not in upd}
    for _ in range(20):
        sent = {k: (g64[k] + v).astype(dtypes[k]) for k, v in upd.items()}
        if noise_std > 0:
            break
        norm = l2_norm(update(sent, global_state))
        if norm <= clip_norm:
            break
        upd = {k: v * (clip_norm / norm) * (1 - 1e-7) for k, v in upd.items()}
    else:
        raise RuntimeError(f"could not bring the update's norm under {clip_norm} after casting to the arrays' dtypes")
    out.update(sent)
    return {k: out[k] for k in state}

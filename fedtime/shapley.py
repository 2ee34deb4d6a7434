"""Exact Shapley values of a small cooperative game: FedMobile-style generator clusters on the server
(`server_app.contribution`) and FedMFS's modalities on each client (`client_app.fedmfs`)."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np


def shapley_values(n_players: int, value: Callable[[frozenset[int]], float]) -> np.ndarray:
    """Exact Shapley values: φ_i = Σ_{S ⊆ N∖{i}} |S|!(n−|S|−1)!/n! · (v(S ∪ {i}) − v(S)); v is called once
    per coalition."""
    if not 1 <= n_players <= 12:
        raise ValueError(f"exact Shapley needs 1..12 players, got {n_players}")
    cache: dict[frozenset[int], float] = {}

    def v(s: frozenset[int]) -> float:
        if s not in cache:
            cache[s] = float(value(s))
        return cache[s]

    phi = np.zeros(n_players)
    players = range(n_players)
    for i in players:
        others = [p for p in players if p != i]
        for size in range(n_players):
            coef = math.factorial(size) * math.factorial(n_players - size - 1) / math.factorial(n_players)
            for s in itertools.combinations(others, size):
                s = frozenset(s)
                phi[i] += coef * (v(s | {i}) - v(s))
    return phi

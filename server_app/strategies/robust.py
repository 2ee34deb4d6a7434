"""Byzantine-robust aggregations delegated to Flower's own strategies (coordinate-wise median, trimmed mean,
Krum); sampling, validation, early stopping and checkpoints stay ours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

from fedtime.config import RunConfig, key
from server_app.run_store import arrays_to_numpy
from server_app.strategies.fedavg import ClientReply, FederationError, MagnetFedAvg


class _FlowerRobust(MagnetFedAvg):
    """Byzantine-robust aggregation delegated to Flower's own strategy of the same name (its
    `aggregate_train` on the round's successful replies); sampling, validation, early stopping and
    checkpoints stay ours."""

    weighted_mean = False

    def __init__(self, cfg: RunConfig, params: Any = None, **kwargs: Any) -> None:
        super().__init__(cfg, params, **kwargs)
        self.flower_strategy = self.flower()

    def flower(self) -> FedAvg:
        """Flower's strategy that aggregates, built from `self.params`."""
        raise NotImplementedError

    def aggregate(self, server_round: int, replies: list[ClientReply], messages: list[Message]) -> dict:
        arrays, _ = self.flower_strategy.aggregate_train(server_round, messages)
        if arrays is None:
            raise FederationError(f"round {server_round}: {type(self.flower_strategy).__name__} returned nothing")
        return arrays_to_numpy(arrays)


class MagnetFedMedian(_FlowerRobust):
    """Coordinate-wise median (Flower's FedMedian)."""

    name = "fedmedian"

    def flower(self) -> FedAvg:
        return FedMedian()


class MagnetFedTrimmedAvg(_FlowerRobust):
    """Coordinate-wise trimmed mean, cutting `trim-beta` of the replies at each end (Flower's FedTrimmedAvg)."""

    name = "fedtrimmedavg"

    @dataclass(frozen=True)
    class Params:
        trim_beta: float = key(0.2, ge=0, lt=0.5)  # fraction of the replies cut at each end

    def flower(self) -> FedAvg:
        return FedTrimmedAvg(beta=self.params.trim_beta)


class MagnetKrum(_FlowerRobust):
    """Krum: the reply closest to its n − f − 2 neighbours, f = `num-malicious` (Flower's Krum)."""

    name = "krum"

    @dataclass(frozen=True)
    class Params:
        num_malicious: int = key(1, ge=0)  # assumed number of Byzantine clients

    def flower(self) -> FedAvg:
        return Krum(num_malicious_nodes=self.params.num_malicious)

    def aggregate(self, server_round: int, replies: list[ClientReply], messages: list[Message]) -> dict:
        """Flower's Krum returns one reply's arrays; which subject that was goes into results.json
        (`aggregation.krum_selected`), so a run can be read for whether an attacker or a client lacking
        a sensor became the global model."""
        new_state = super().aggregate(server_round, replies, messages)
        gap = [sum(float(np.sum((np.asarray(r.state[k], np.float64) - np.asarray(v, np.float64)) ** 2))
                   for k, v in new_state.items()) for r in replies]
        self.aggregation_info = {"krum_selected": replies[int(np.argmin(gap))].subject}
        return new_state

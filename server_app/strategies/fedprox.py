"""FedProx (Li et al., 2020): FedAvg whose clients add a proximal term towards the round's global model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtime.config import key
from server_app.strategies.fedavg import MagnetFedAvg


class MagnetFedProx(MagnetFedAvg):
    """FedProx: clients add (mu/2)·||w − w_global||² over the trainable parameters."""

    name = "fedprox"

    @dataclass(frozen=True)
    class Params:
        proximal_mu: float = key(0.01, ge=0)

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "proximal-mu": float(self.params.proximal_mu)}

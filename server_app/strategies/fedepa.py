"""FedEPA (arXiv 2504.12025): personalized local aggregation and unsupervised modality alignment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtime.config import ConfigError, key
from server_app.strategies.fedavg import MagnetFedAvg


class MagnetFedEPA(MagnetFedAvg):
    """FedEPA, from its description (no public code; our choices in docs/strategies.md):

    * personalized local aggregation (FedALA-style, `client_app/fedepa.py`): each client mixes the global model
      into its own on `ala-layers` with element-wise weights W in [0, 1], learnt on a slice of its labelled
      windows and kept in the node's state; the server averages the uploads as FedAvg does;
    * unsupervised modality alignment (`model/alignment.py`): aligned/context split of each modality's
      embedding, InfoNCE across modalities on the aligned parts, an independence term, self-attention over the
      parts; weighted by `alignment-weight`, also on the windows without a label (`labeled-fraction`).

    Its personalized evaluation ("own") is each client's ALA-mixed model on its held-out windows.
    """

    name = "fedepa"
    personal_eval = "own"

    @dataclass(frozen=True)
    class Params:
        alignment_weight: float = key(1.0, ge=0)  # weight of the alignment loss in local training
        ala_layers: str = "fusion,classifier"     # top layers mixed element-wise (alignment, fusion, classifier)
        ala_slice: float = key(0.8, gt=0, le=1)   # share of the client's labelled windows that trains W
        ala_lr: float = key(1.0, gt=0)            # step size of W (FedALA's eta)
        ala_first_epochs: int = key(5, ge=1)      # epochs over the slice the first time W is learnt
        ala_epochs: int = key(1, ge=1)            # epochs over the slice in later rounds

        def __post_init__(self) -> None:
            from model.network import HEAD_MODULES

            layers = [x.strip() for x in self.ala_layers.split(",") if x.strip()]
            if not layers or any(x not in HEAD_MODULES for x in layers):
                raise ConfigError(f"run-config key 'fedepa.ala-layers' must be a comma-separated subset of "
                                  f"{','.join(HEAD_MODULES)}, got '{self.ala_layers}'")

    def model_options(self) -> dict[str, Any]:
        return {"modality_alignment": True}

    def client_config(self) -> dict[str, Any]:
        p = self.params
        layers = ",".join(x.strip() for x in p.ala_layers.split(",") if x.strip())
        return {**super().client_config(), "alignment-weight": float(p.alignment_weight), "ala-layers": layers,
                "ala-slice": float(p.ala_slice), "ala-lr": float(p.ala_lr),
                "ala-first-epochs": int(p.ala_first_epochs), "ala-epochs": int(p.ala_epochs)}

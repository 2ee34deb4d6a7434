"""FedMFS (arXiv 2310.07048): each client uploads only the encoders of its most valuable, cheapest modalities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from data_partition.constants import MODALITIES
from fedtime.config import ConfigError, key
from model.state import modality_encoder_keys
from server_app.strategies.fedavg import ClientReply, FederationError, MagnetFedAvg, weighted_average


class MagnetFedMFS(MagnetFedAvg):
    """Selective modality upload (FedMFS; recency from MFedMC, arXiv 2401.16685).

    * Each client measures every modality's exact Shapley value (16 coalitions of the 4 sensors, a coalition being
      a presence mask) on its held-out windows: value = weighted F1 (or accuracy) of the fused prediction.
    * priority = shapley-weight · Shapley (min-max scaled) + size-weight · (1 − encoder bytes / largest) +
      recency-weight · rounds since it last sent the modality (scaled); it uploads the encoders of its
      `upload-modalities` (γ) highest-priority modalities among those it has.
    * The server averages each encoder over the clients that sent it (sample-weighted) and keeps the others.
      A client replaces its own encoders by the global ones only for the modalities someone uploaded in the
      previous round (`fedmfs-fresh` in the round's config); the others stay as it trained them.
    * `head = "shared"`: the fusion and classifier are uploaded and averaged every round; `"local"`: each client
      keeps its own in the node's state and never sends it (FedMFS's local fusion). Without a shared head the
      global model cannot classify a new subject: each round is validated by the clients' personal models on
      their held-out windows, there is no test on the test subjects, and the personalized evaluation (run config
      `personal-eval-fraction`) is the result.
    """

    name = "fedmfs"

    @dataclass(frozen=True)
    class Params:
        upload_modalities: int = key(2, ge=1, le=len(MODALITIES))  # γ: encoders a client sends per round
        shapley_weight: float = key(1.0, ge=0)  # αs
        size_weight: float = key(1.0, ge=0)     # αc
        recency_weight: float = key(0.0, ge=0)  # αr (MFedMC)
        shapley_value: str = key("weighted_f1", choices=("weighted_f1", "accuracy"))
        head: str = key("shared", choices=("shared", "local"))
        local_val_fraction: float = key(0.1, gt=0, lt=0.5)  # held-out share for the Shapley values

        def __post_init__(self) -> None:
            if not self.shapley_weight + self.size_weight + self.recency_weight > 0:
                raise ConfigError("run-config keys 'fedmfs.shapley-weight', 'fedmfs.size-weight' and "
                                  "'fedmfs.recency-weight' cannot all be 0")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fresh: list[str] | None = None  # modalities whose global encoder the last round updated

    def round_config(self, server_round: int) -> dict[str, Any]:
        if self.fresh is None and self.store is not None and self.store.results.get("history"):  # resumed run
            if self.dp is not None:  # under DP every encoder changed (`aggregate`)
                self.fresh = list(self.cfg.modality_list)
            else:
                last = self.store.results["history"][-1].get("aggregation", {}).get("uploaded", {})
                self.fresh = sorted({m for ms in last.values() for m in ms})
        return {"fedmfs-fresh": ",".join(self.fresh or [])}

    @property
    def personal_eval(self) -> str:  # type: ignore[override]
        return "own" if self.params.head == "local" else "finetune"

    @property
    def global_head(self) -> bool:
        return self.params.head == "shared"

    def client_config(self) -> dict[str, Any]:
        p = self.params
        return {**super().client_config(), "upload-modalities": int(p.upload_modalities),
                "shapley-weight": float(p.shapley_weight), "size-weight": float(p.size_weight),
                "recency-weight": float(p.recency_weight), "shapley-value": p.shapley_value, "fedmfs-head": p.head,
                "local-val-fraction": float(p.local_val_fraction)}

    def aggregate(self, server_round: int, replies: list[ClientReply], messages: list[Message]) -> dict:
        """Each array: the sample-weighted mean over the replies that carry it, else the round's global value.
        Under DP: the noisy uniform mean over the m sampled clients of every array, an array a client did not
        send being a zero update; every global array then changes (by the noise at least), so every modality is
        fresh (which encoders someone uploaded is the clients' own choice and stays out of the next round's
        config)."""
        keys = list(self.global_state)
        unknown = sorted({k for r in replies for k in r.state} - set(keys))
        if unknown:
            raise FederationError(f"round {server_round}: replies carry arrays the global model does not have: "
                                  f"{unknown[:3]}")
        out = dict(self.global_state)
        if self.dp is not None:
            out = self.average(replies, [], keys)
        else:
            for k in keys:
                holders = [r for r in replies if k in r.state]
                if holders:
                    out[k] = weighted_average([{k: r.state[k]} for r in holders],
                                              [float(r.num_examples) for r in holders])[k]
        groups = modality_encoder_keys(keys)
        self.fresh = [m for m, ks in groups.items() if self.dp is not None or any(ks[0] in r.state for r in replies)]
        self.aggregation_info = {
            "uploaded": {str(r.subject): [m for m, ks in groups.items() if ks and ks[0] in r.state] for r in replies},
            "shapley": {str(r.subject): {m: round(r.metrics[f"shapley-{m}"], 4) for m in groups
                                         if f"shapley-{m}" in r.metrics} for r in replies},
        }
        return {k: out[k] for k in keys}

    def round_validation(self, server_round: int, arrays: ArrayRecord,
                         evaluate_fn: Callable[[int, ArrayRecord], MetricRecord]) -> MetricRecord:
        if self.global_head:
            return evaluate_fn(server_round, arrays)
        # local heads: the clients' personal models on their held-out windows, pooled by window count
        replies = self.round_replies
        n = np.array([r.metrics["local_val_windows"] for r in replies], dtype=np.float64)

        def mean(name: str) -> float:
            return float(np.dot([r.metrics[name] for r in replies], n) / n.sum())

        return MetricRecord({"val_loss": mean("local_val_loss_after"), "val_accuracy": mean("local_val_accuracy"),
                             "val_weighted_f1": mean("local_val_weighted_f1"),
                             "val_macro_f1": mean("local_val_macro_f1")})

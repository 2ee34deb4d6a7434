"""FedAvg with a server learning rate (FedOpt with plain SGD on the server, Reddi et al., ICLR 2021): the global
model moves `server-lr` of the way from itself to the clients' weighted mean; 1.0 is FedAvg. Also the worked
example of docs/architecture.md, "Add a strategy"."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtime.config import key
from server_app.strategies.fedavg import ClientReply, MagnetFedAvg


class MagnetFedAvgSLR(MagnetFedAvg):
    name = "fedavg-slr"

    @dataclass(frozen=True)
    class Params:
        server_lr: float = key(1.0, gt=0)  # the server's step towards the clients' mean

    def aggregate(self, server_round: int, replies: list[ClientReply], messages: list) -> dict:
        mean = super().aggregate(server_round, replies, messages)  # sample-weighted (modality-aware if asked)
        out = {}
        for k, m in mean.items():
            if not np.issubdtype(m.dtype, np.floating):
                out[k] = m  # counters (BatchNorm's num_batches_tracked) as FedAvg has them
                continue
            g = self.global_state[k].astype(np.float64)
            out[k] = (g + self.params.server_lr * (m.astype(np.float64) - g)).astype(m.dtype)
        return out

"""FedMobile-style aggregation (arXiv 2502.15839): contribution-aware weights and latent generators that
reconstruct missing modalities' embeddings, aggregated with clustered Shapley weights (docs/strategies.md)."""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log

from fedtime.config import ConfigError, RunConfig, key
from server_app.contribution import clustered_shapley_weights, contribution_weights
from server_app.run_store import RunStore
from server_app.strategies.fedavg import ClientReply, FederationError, MagnetFedAvg, weighted_average


class MagnetFedMobile(MagnetFedAvg):
    """FedMobile-style aggregation (arXiv 2502.15839) for federations with missing modalities.

    * Everything but the latent generators is averaged with contribution-aware weights: a mix of each client's
      sample share, local validation F1 share and loss-reduction share on its held-out windows
      (`contribution_weights`).
    * The generators (cross-modal latent reconstruction, `model/generators.py`) are averaged with clustered
      Shapley weights: their outputs on a server-held proxy set are clustered, the clusters play an exact
      Shapley game whose value is the reconstruction R² of their averaged generator on that proxy set. The
      averaged generators' R² per modality becomes their `quality`: the gate that decides whether a generated
      embedding joins the fusion, in the next round's training and at evaluation.
    """

    name = "fedmobile"

    @dataclass(frozen=True)
    class Params:
        samples_weight: float = key(1.0, ge=0)  # aggregation weight = mix of sample share, local validation F1
        perf_weight: float = key(1.0, ge=0)     # share and loss-reduction share, weighted by these three
        gain_weight: float = key(1.0, ge=0)
        local_val_fraction: float = key(0.1, gt=0, lt=0.5)  # share of a client's windows held out for the above
        generator_weight: float = key(1.0, ge=0)  # distillation loss weight of the latent generators
        generator_objective: str = key("embedding", choices=("embedding", "prediction"))
        shapley_clusters: int = key(3, ge=1)  # clusters of generators (players of the exact Shapley game)
        proxy_windows: int = key(256, ge=1)  # server proxy set: windows drawn from the validation subjects

        def __post_init__(self) -> None:
            if not self.samples_weight + self.perf_weight + self.gain_weight > 0:
                raise ConfigError("run-config keys 'fedmobile.samples-weight', 'fedmobile.perf-weight' and "
                                  "'fedmobile.gain-weight' cannot all be 0")

    def __init__(self, cfg: RunConfig, params: Any = None, *, generator_proxy: Any = None, **kwargs: Any) -> None:
        super().__init__(cfg, params, **kwargs)
        p = self.params
        self.mix = (p.samples_weight, p.perf_weight, p.gain_weight)
        self.local_val_fraction = p.local_val_fraction
        self.shapley_clusters = p.shapley_clusters
        self.generator_proxy = generator_proxy

    @classmethod
    def from_config(cls, cfg: RunConfig, *, split: Any, store: RunStore | None = None) -> "MagnetFedMobile":
        from server_app.proxy import GeneratorProxy

        params = cls.read_params(cfg)
        proxy = GeneratorProxy(cfg, cls.options_for(params), split.val, params.proxy_windows, seed=cfg.seed)
        return cls(cfg, params, train_subjects=list(split.train), store=store, generator_proxy=proxy)

    @staticmethod
    def options_for(params: Any) -> dict[str, Any]:
        return {"latent_generators": True, "generator_objective": params.generator_objective}

    def model_options(self) -> dict[str, Any]:
        return self.options_for(self.params)

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "local-val-fraction": float(self.local_val_fraction),
                "generator-weight": float(self.params.generator_weight)}

    def aggregation_weights(self, replies: list[ClientReply]) -> list[float]:
        for r in replies:
            if "local_val_weighted_f1" not in r.metrics:
                raise FederationError(f"subject {r.subject:02d} sent no local validation metrics: is its ClientApp "
                                      "this project's, and was local-val-fraction sent?")
        f1, gain, unmeasured = self._local_scores(replies)
        if unmeasured:
            log(WARNING, "contribution of subject(s) %s not measurable (non-finite local validation F1 or loss): "
                "a non-finite F1 or loss gain counts as 0", unmeasured)
        return contribution_weights([r.num_examples for r in replies], f1, gain, self.mix).tolist()

    @staticmethod
    def _local_scores(replies: list[ClientReply]) -> tuple[list[float], list[float], list[int]]:
        """Each reply's local validation F1 and loss gain, a NaN or inf one counted as 0 (the global model broken
        on a client's data, e.g. a BatchNorm variance pushed below 0 by a scaled update, measures nothing),
        and the subjects that had one."""
        f1 = [r.metrics["local_val_weighted_f1"] for r in replies]
        gain = [r.metrics["local_val_loss_before"] - r.metrics["local_val_loss_after"] for r in replies]
        unmeasured = [r.subject for r, a, b in zip(replies, f1, gain) if not (np.isfinite(a) and np.isfinite(b))]
        return ([a if np.isfinite(a) else 0.0 for a in f1], [b if np.isfinite(b) else 0.0 for b in gain],
                unmeasured)

    def aggregate(self, server_round: int, replies: list[ClientReply], messages: list[Message]) -> dict:
        if self.dp is not None:
            return self.private_aggregate(replies)
        weights = self.aggregation_weights(replies)
        keys = list(replies[0].state)
        gen_keys = [k for k in keys if k.startswith("generators.")]
        body = self.average(replies, weights, [k for k in keys if k not in gen_keys])
        info: dict[str, Any] = {**self.aggregation_info,
                                "weights": {str(r.subject): w for r, w in zip(replies, weights)}}
        unmeasured = self._local_scores(replies)[2]
        if unmeasured:
            info["unmeasured"] = unmeasured
        if gen_keys:
            gens = [{k: r.state[k] for k in gen_keys} for r in replies]
            sizes = [float(r.num_examples) for r in replies]
            if self.generator_proxy is not None and len(replies) > 1:
                proxy = self.generator_proxy
                proxy.prepare({**body, **gens[0]})
                outputs = [proxy.outputs(g) for g in gens]
                # finite arrays can still generate NaN (a scaled update can make a variance buffer negative):
                # such generators get weight 0 and stay out of the clustering
                usable = [i for i, o in enumerate(outputs) if np.isfinite(o).all()]
                if not usable:
                    raise FederationError(f"round {server_round}: every client's generators produce non-finite "
                                          f"embeddings on the proxy set (subjects {[r.subject for r in replies]})")

                def coalition_value(members: list[int]) -> float:
                    members = [usable[i] for i in members]
                    return proxy.value(weighted_average([gens[i] for i in members], [sizes[i] for i in members]))

                w_usable, details = clustered_shapley_weights(np.stack([outputs[i] for i in usable]),
                                                              [sizes[i] for i in usable], self.shapley_clusters,
                                                              coalition_value, seed=server_round)
                gen_w = np.zeros(len(replies))
                gen_w[usable] = w_usable
                info["generators"] = {"clusters": {str(replies[i].subject): c
                                                   for i, c in zip(usable, details["clusters"])},
                                      "shapley": details["shapley"],
                                      "weights": {str(r.subject): float(w) for r, w in zip(replies, gen_w)},
                                      "rejected": [r.subject for i, r in enumerate(replies) if i not in usable]}
            else:
                gen_w = sizes
            body.update(weighted_average(gens, list(gen_w)))
            if self.generator_proxy is not None and "generators.quality" in body:
                # the gate of the generated nodes: the aggregated generators' quality on the proxy set, per
                # modality (R², or the cross-entropy they save for generators distilled towards the prediction)
                r2 = self.generator_proxy.quality({k: body[k] for k in gen_keys})
                body["generators.quality"] = np.asarray(r2, dtype=body["generators.quality"].dtype)
                info["generator_quality"] = [round(float(q), 4) for q in r2]
        self.aggregation_info = info
        return {k: body[k] for k in keys}

    def private_aggregate(self, replies: list[ClientReply]) -> dict:
        """Under DP: every array (generators included) is the noisy uniform mean of the clipped updates: the
        contribution weights and the generators' Shapley weights are functions of single clients' data, which
        would let one client's influence exceed the clip. The generators' quality gate is still measured on the
        server's proxy set, from the private aggregate (post-processing)."""
        keys = list(self.global_state)
        body = self.average(replies, [], keys)
        gen_keys = [k for k in keys if k.startswith("generators.")]
        if self.generator_proxy is not None and "generators.quality" in body:
            self.generator_proxy.prepare(body)
            q = self.generator_proxy.quality({k: body[k] for k in gen_keys})
            body["generators.quality"] = np.asarray(q, dtype=body["generators.quality"].dtype)
            self.aggregation_info = {"generator_quality": [round(float(v), 4) for v in q]}
        return body

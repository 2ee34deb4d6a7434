"""FedAvg for Time-MAGNET, and the base every strategy extends: subject-aware sampling, early stopping and
checkpoint/resume.

Flower's `Strategy.start` loops 1..N with no stop hook, no resume and samples node ids with the global
`random`; this module overrides `start` so that a run
  * maps SuperNodes to MEx subjects once (a QUERY message), then samples *subjects* with the paper's RNG,
    so the client sequence is reproducible across runs, restarts and deployments;
  * aggregates only what clients send (trainable state), sample-weighted, in float64, in subject order;
  * validates on the server after every round, keeps the best round and stops after `patience` rounds
    without improvement;
  * checkpoints global/best weights plus sampler and early-stopping state after every round;
  * with `dp-noise-multiplier` > 0, is user-level differentially private (server_app/privacy.py): clipped updates,
    their uniform mean plus Gaussian noise in place of the weighted mean, subjects drawn with OS entropy, ε after
    every round and a budget that stops the run.

A strategy owns its configuration: `Params` (a dataclass of its own keys, the run config's `[<name>]` table),
`model_options` (what the model needs for it) and `client_config` (what its clients receive every round, in
Flower's train config). `from_config` builds it from a RunConfig; docs/architecture.md, "Add a strategy".
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from data_partition.splits import shuffle_order
from fedtime.config import ConfigError, RunConfig, check_fields, coerce_fields
from fedtime.task import options_to_message
from model.state import modality_encoder_keys
from server_app.privacy import UserLevelDP
from server_app.run_store import RunStore, arrays_to_numpy, numpy_to_arrays


class FederationError(RuntimeError):
    """The federation cannot make progress (too few nodes or replies)."""


# --------------------------------------------------------------------------- sampling
class ClientSampler:
    """Samples subjects per round exactly like the paper's script (`random.seed(s)`, shuffle 1..30, then
    `random.sample(train_clients, k)` on the same RNG), restricted to the subjects that are connected.

    `secret=True` (under differential privacy) draws them with the operating system's entropy instead: the
    accountant's privacy amplification by sampling holds only if nobody can predict the sample, and the paper's
    sequence follows from the split seed written in results.json. Such a sampler has no state to checkpoint."""

    def __init__(self, split_seed: int, train_subjects: Iterable[int], secret: bool = False) -> None:
        self.rng = random.Random(split_seed)
        train = set(train_subjects)
        # the split's shuffle on this RNG (consumed exactly as the split did); train subjects in that order
        self.order = [s for s in shuffle_order(split_seed, rng=self.rng) if s in train]
        self.secret = secret
        if secret:
            self.rng = secrets.SystemRandom()

    def pool(self, available: Iterable[int]) -> list[int]:
        """The training subjects among `available` that `sample` draws from."""
        avail = set(available)
        return [s for s in self.order if s in avail]

    def sample(self, available: Iterable[int], k: int) -> list[int]:
        pool = self.pool(available)
        if len(pool) < k:
            raise FederationError(f"cannot sample {k} clients: only {len(pool)} training subjects are "
                                  f"connected ({sorted(pool)})")
        return self.rng.sample(pool, k)

    def get_state(self) -> list | None:
        if self.secret:
            return None
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def set_state(self, state: list | None) -> None:
        if self.secret or state is None:
            return
        self.rng.setstate((state[0], tuple(state[1]), state[2]))


# --------------------------------------------------------------------------- early stopping
@dataclass
class EarlyStopping:
    """Maximises a validation metric; ties are not improvements (so the earliest best round is kept)."""

    patience: int
    best: float = float("-inf")
    best_round: int = 0
    bad_rounds: int = 0

    def update(self, server_round: int, value: float) -> bool:
        """Record a round's metric; returns True when it is the new best."""
        if value > self.best:
            self.best, self.best_round, self.bad_rounds = value, server_round, 0
            return True
        self.bad_rounds += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_rounds >= self.patience


# --------------------------------------------------------------------------- aggregation
def nonfinite_arrays(state: dict[str, np.ndarray]) -> list[str]:
    """Names of the floating arrays holding NaN or inf."""
    return [k for k, v in state.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]


def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Exact sample-weighted mean, accumulated in float64 and cast back to each array's dtype."""
    if not states:
        raise ValueError("nothing to aggregate")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {weights}")
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"reply {i} carries different arrays than reply 0")
    out = {}
    for k in keys:
        acc = np.zeros(states[0][k].shape, dtype=np.float64)
        for s, w in zip(states, weights):
            if s[k].shape != acc.shape:
                raise ValueError(f"array '{k}' has shape {s[k].shape}, expected {acc.shape}")
            acc += s[k].astype(np.float64) * (w / total)
        out[k] = acc.astype(states[0][k].dtype)
    return out


def duration(seconds: float) -> str:
    """`3m20s`, `1h05m`, `45s`: the round line's ETA, readable at a glance."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _metrics(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


@dataclass
class ClientReply:
    subject: int
    num_examples: int
    state: dict[str, np.ndarray]
    metrics: dict[str, float]
    bytes_up: int


# --------------------------------------------------------------------------- FedAvg
class MagnetFedAvg(FedAvg):
    """Sample-weighted FedAvg over subjects with server validation, early stopping and checkpoints."""

    name = "fedavg"
    weighted_mean = True  # aggregates through `average` (so `modality-aware-averaging` applies)
    personal_eval = "finetune"  # personalized evaluation: the global model fine-tuned one local epoch per client

    @dataclass(frozen=True)
    class Params:
        """FedAvg has no parameters of its own."""

    def __init__(self, cfg: RunConfig, params: Any = None, *, train_subjects: list[int],
                 store: RunStore | None = None) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.clients_per_round,
                         min_available_nodes=cfg.clients_per_round)
        self.cfg = cfg
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{type(self).__name__} takes {self.Params.__qualname__}, got {type(self.params).__name__}")
        self.check_shared_keys(cfg)
        self.clients_per_round = cfg.clients_per_round
        self.min_train_replies = cfg.min_train_replies
        self.dp = UserLevelDP.from_config(cfg)  # None: DP off
        self.sampler = ClientSampler(cfg.split_seed, train_subjects, secret=self.dp is not None)
        self.early_stopping = EarlyStopping(cfg.patience)
        self.store = store
        self.subject_of_node: dict[int, int] = {}
        self.best_arrays: ArrayRecord | None = None
        self.aggregation_info: dict[str, Any] = {}  # what `aggregate` wants recorded for the round
        self.global_state: dict[str, np.ndarray] = {}  # the global model the round's clients started from
        self.modality_aware_averaging = cfg.modality_aware_averaging
        self.round_replies: list[ClientReply] = []  # the last round's successful replies
        self.privacy: dict[str, Any] | None = None  # results.json's `privacy` block (DP runs)
        self.stop_reason: str | None = None  # why the run stopped before its last round, other than patience

    # ----- configuration
    @classmethod
    def check_shared_keys(cls, cfg: RunConfig) -> None:
        """The shared keys this strategy cannot honour, refused by name: `modality-aware-averaging` and DP apply to
        the weighted-mean strategies only (DP bounds one user's influence through the uniform mean of clipped
        updates, which a median, trimmed mean or Krum's pick is not), and DP replaces the modality-aware weights
        (counts of a client's own windows) by that uniform mean."""
        if cfg.modality_aware_averaging and not cls.weighted_mean:
            raise ConfigError(f"run-config key 'modality-aware-averaging' applies to the weighted-mean strategies, "
                              f"not to '{cls.name}'")
        if cfg.dp_noise_multiplier > 0 and not cls.weighted_mean:
            raise ConfigError(f"run-config key 'dp-noise-multiplier' (user-level differential privacy) applies to "
                              f"the weighted-mean strategies, not to '{cls.name}'")
        if cfg.dp_noise_multiplier > 0 and cfg.modality_aware_averaging:
            raise ConfigError("run-config keys 'dp-noise-multiplier' and 'modality-aware-averaging' exclude each "
                              "other: under differential privacy every update enters the uniform mean")

    @classmethod
    def read_params(cls, cfg: RunConfig) -> Any:
        """This strategy's `Params` from the run config's `[<name>]` table: unknown keys, wrong types, non-finite
        numbers and values out of their declared range are refused, naming the key."""
        params = cls.Params(**coerce_fields(cls.Params, cfg.options_of(cls.name), prefix=f"{cls.name}."))
        check_fields(params, prefix=f"{cls.name}.")
        return params

    @classmethod
    def from_config(cls, cfg: RunConfig, *, split: Any, store: RunStore | None = None) -> "MagnetFedAvg":
        """The strategy a run config asks for, over the split's training subjects."""
        return cls(cfg, cls.read_params(cfg), train_subjects=list(split.train), store=store)

    def model_options(self) -> dict[str, Any]:
        """Options of `build_model` this strategy needs on every party (FedMobile: latent generators)."""
        return {}

    def client_config(self) -> dict[str, Any]:
        """What clients receive in every round's train config: the strategy's client settings (FedProx: its mu)
        and its model options. The ServerApp passes it to `start` as Flower's `train_config`."""
        return options_to_message(self.model_options())

    # ----- hooks other strategies override
    def round_config(self, server_round: int) -> dict[str, Any]:
        """What this round's clients receive besides `client_config` (FedMFS: which encoders were just updated)."""
        return {}

    def aggregation_weights(self, replies: list[ClientReply]) -> list[float]:
        return [float(r.num_examples) for r in replies]

    def aggregate(self, server_round: int, replies: list[ClientReply], messages: list[Message]) -> dict:
        """New global trainable state from the successful replies (both lists in subject order)."""
        return self.average(replies, self.aggregation_weights(replies), list(replies[0].state))

    def average(self, replies: list[ClientReply], weights: list[float], keys: list[str]) -> dict:
        """`weighted_average` of the replies' `keys`. With `modality-aware-averaging`, modality m's encoder is
        averaged with each weight scaled by the share of that client's training windows that have m: a client
        without the sensor sends its encoder back untrained, and a plain average would dilute the others'
        update by its weight. Clients with no window of m are recorded in `aggregation.lacking`.
        Under DP: the global state plus the noisy uniform mean of the clipped updates over the m sampled clients
        (`weights` ignored; a strategy calls it once per array, as every call adds fresh noise)."""
        if self.dp is not None:
            return self.dp.mean([r.state for r in replies], self.global_state, keys)

        def mean(ks: list[str], ws: list[float]) -> dict:
            return weighted_average([{k: r.state[k] for k in ks} for r in replies], ws)

        if not self.modality_aware_averaging:
            return mean(keys, weights)
        out, lacking = {}, {}
        for m, mkeys in modality_encoder_keys(keys).items():
            counts = [r.metrics.get(f"present-{m}") for r in replies]
            if None in counts:
                subject = replies[counts.index(None)].subject
                raise FederationError(f"subject {subject:02d} sent no 'present-{m}' count, which "
                                      "modality-aware-averaging needs: is its ClientApp this project's?")
            scaled = [w * c / max(r.num_examples, 1) for w, c, r in zip(weights, counts, replies)]
            if sum(scaled) > 0:  # nobody had m: every reply's encoder is the global one, the plain mean keeps it
                out.update(mean(mkeys, scaled))
            if any(c == 0 for c in counts):
                lacking[m] = [r.subject for r, c in zip(replies, counts) if c == 0]
        out.update(mean([k for k in keys if k not in out], weights))
        if lacking:
            self.aggregation_info["lacking"] = lacking
        return {k: out[k] for k in keys}

    @property
    def global_head(self) -> bool:
        """Whether the global model has a trained fusion and classifier, i.e. can be validated and tested on
        held-out subjects (FedMFS with a local head has none: only personal models exist)."""
        return True

    def round_validation(self, server_round: int, arrays: ArrayRecord,
                         evaluate_fn: Callable[[int, ArrayRecord], MetricRecord]) -> MetricRecord:
        """The round's validation figures (`val_loss`, `val_accuracy`, `val_weighted_f1`, `val_macro_f1`) that
        early stopping reads: the global model on the validation subjects."""
        return evaluate_fn(server_round, arrays)

    def summary(self) -> None:
        log(INFO, "\t├──> %s: %d clients per round, patience %d", type(self).__name__,
            self.clients_per_round, self.early_stopping.patience)

    # ----- discovery
    def discover(self, grid: Grid, timeout: float, wait: float | None = None) -> dict[int, int]:
        """Ask every connected SuperNode which subject it holds. Waits up to `wait` seconds (`discovery-timeout`)
        for `clients_per_round` nodes, saying every 10 s how many are there, then fails naming both numbers (a
        simulation has all its nodes at once: a federation too small for the run fails fast)."""
        wait = self.cfg.discovery_timeout if wait is None else wait
        t0 = last_note = time.time()
        while len(node_ids := sorted(grid.get_node_ids())) < self.clients_per_round:
            if time.time() - t0 > wait:
                raise FederationError(
                    f"{len(node_ids)} SuperNodes connected, but clients-per-round={self.clients_per_round} needs at "
                    f"least {self.clients_per_round} (waited discovery-timeout={wait:g} s). Simulation: "
                    f"--federation-config \"num-supernodes=21\"; deployment: start more SuperNodes or raise "
                    f"discovery-timeout")
            if time.time() - last_note >= 10.0:
                last_note = time.time()
                log(INFO, "waiting for SuperNodes: %d connected, %d needed (clients-per-round); %.0f s left",
                    len(node_ids), self.clients_per_round, wait - (last_note - t0))
            time.sleep(0.5)
        msgs = [Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY,
                        dst_node_id=n) for n in node_ids]
        mapping: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                log(WARNING, "node %d did not report its subject: %s", reply.metadata.src_node_id,
                    reply.error.reason)
                continue
            subject = int(_metrics(reply)["subject"])
            if subject in mapping.values():
                raise FederationError(f"two SuperNodes hold subject {subject}: check their partition-id")
            mapping[reply.metadata.src_node_id] = subject
        if len(mapping) < self.clients_per_round:
            raise FederationError(f"only {len(mapping)} SuperNodes reported a subject; need "
                                  f"clients-per-round={self.clients_per_round}")
        self.subject_of_node = mapping
        log(INFO, "discovered %d clients: subjects %s", len(mapping), sorted(mapping.values()))
        return mapping

    # ----- one round
    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    timeout: float) -> tuple[ArrayRecord, dict[str, Any]]:
        subjects = self.sampler.sample(self.subject_of_node.values(), self.clients_per_round)
        node_of = {s: n for n, s in self.subject_of_node.items()}
        dp_config = self.dp.round_config() if self.dp is not None else {}
        cfg = ConfigRecord({**dict(config), **self.round_config(server_round), **dp_config,
                            "server-round": server_round})
        content = RecordDict({"arrays": arrays, "config": cfg})
        msgs = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_of[s])
                for s in subjects]
        bytes_down = arrays.count_bytes() * len(msgs)
        t0 = time.time()
        raw = list(grid.send_and_receive(msgs, timeout=timeout))
        # attribute each reply through the message it answers: an error reply the SuperLink makes for a
        # dead node is not sent *by* that node
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}

        def subject_of(reply: Message) -> int:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            return self.subject_of_node.get(node, -1)

        self.global_state = arrays_to_numpy(arrays)  # the round's starting point, for strategies that step from it
        replies, failures, ok_messages = [], [], []
        answered = set()
        for m in sorted(raw, key=subject_of):
            subject = subject_of(m)
            answered.add(subject)
            if m.has_error():
                failures.append({"subject": subject, "reason": str(m.error.reason)})
                continue
            rec = m.content["arrays"]
            state = arrays_to_numpy(rec)
            bad = nonfinite_arrays(state)
            if bad:
                # a diverged or hostile client: averaging it would make the global model NaN or inf
                failures.append({"subject": subject, "reason": f"non-finite values in {len(bad)} array(s): "
                                                               f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}"})
                continue
            refused = self.dp.refuse(state, self.global_state) if self.dp is not None else None
            if refused:  # under DP: a zero update in the uniform mean, like a client that did not answer
                failures.append({"subject": subject, "reason": refused})
                continue
            ok_messages.append(m)
            met = dict(_metrics(m))
            replies.append(ClientReply(subject, int(met["num-examples"]), state,
                                       {k: float(v) for k, v in met.items() if isinstance(v, (int, float))},
                                       rec.count_bytes()))
        for s in subjects:
            if s not in answered:
                failures.append({"subject": s, "reason": f"no reply within {timeout:.0f} s"})
        for f in failures:
            log(WARNING, "round %d: client (subject %02d) failed: %s", server_round, f["subject"], f["reason"])
        if len(replies) < self.min_train_replies:
            raise FederationError(f"round {server_round}: {len(replies)} successful replies, fewer than "
                                  f"min-train-replies={self.min_train_replies}; failures: {failures}")
        self.aggregation_info = {}
        self.round_replies = replies
        new_state = self.aggregate(server_round, replies, ok_messages)
        n = sum(r.num_examples for r in replies)
        info = {
            "clients": subjects,
            "trained": [r.subject for r in replies],
            "failures": failures,
            "num_examples": n,
            "train_loss": sum(r.metrics.get("train_loss", np.nan) * r.num_examples for r in replies) / n,
            "train_accuracy": sum(r.metrics.get("train_accuracy", np.nan) * r.num_examples for r in replies) / n,
            "bytes_down": int(bytes_down),
            "bytes_up": int(sum(r.bytes_up for r in replies)),
            "bytes_up_by_subject": {str(r.subject): int(r.bytes_up) for r in replies},
            "client_train_s": time.time() - t0,
        }
        if self.aggregation_info:
            info["aggregation"] = self.aggregation_info
        return numpy_to_arrays(new_state), info

    # ----- the loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        if evaluate_fn is None:
            raise ValueError("validation-based early stopping needs evaluate_fn")
        store = self.store
        train_config = train_config or ConfigRecord()
        result = Result()
        arrays, first_round = initial_arrays, 1
        state = store.load_checkpoint() if store else None
        if state is not None:
            arrays = state["global"]
            self.best_arrays = state["best"]
            self.sampler.set_state(state["sampler"])
            # counters from the checkpoint, patience from this run's config: a stopped run resumed with a
            # longer patience continues
            self.early_stopping = EarlyStopping(**{**state["early_stopping"],
                                                   "patience": self.early_stopping.patience})
            first_round = state["round"] + 1
            log(INFO, "resuming %s after round %d (best round %d)", store.path, state["round"],
                self.early_stopping.best_round)
        if self.early_stopping.should_stop or first_round > num_rounds:
            result.arrays = self.best_arrays or arrays
            return result
        self.discover(grid, timeout)
        if self.dp is not None:
            self.start_accounting(first_round - 1)
        walls: list[float] = []  # this process's rounds (a resumed run's earlier ones ran elsewhere)
        for rnd in range(first_round, num_rounds + 1):
            if self.over_budget(rnd):
                break
            t0 = time.time()
            arrays, info = self.train_round(grid, rnd, arrays, train_config, timeout)
            val = self.round_validation(rnd, arrays, evaluate_fn)
            improved = self.early_stopping.update(rnd, float(val["val_weighted_f1"]))
            if improved:
                self.best_arrays = arrays
            info.update({k: float(v) for k, v in val.items()})
            info.update(round=rnd, wall_s=time.time() - t0, best_round=self.early_stopping.best_round)
            eps_note = ""
            if self.dp is not None:
                info["epsilon"] = self.dp.epsilon(rnd)
                self.privacy["epsilon"].append(info["epsilon"])
                eps_note = f" | ε {info['epsilon']:.3g} (δ {self.dp.delta:g})"
            result.train_metrics_clientapp[rnd] = MetricRecord(
                {"train_loss": info["train_loss"], "num-examples": info["num_examples"]})
            result.evaluate_metrics_serverapp[rnd] = val
            walls.append(info["wall_s"])
            eta = f" | ETA {duration(sum(walls) / len(walls) * (num_rounds - rnd))}" if rnd < num_rounds else ""
            log(INFO, "[round %d/%d] clients %s | train loss %.4f | val loss %.4f acc %.4f wF1 %.4f mF1 %.4f | "
                "up %.2f MB down %.2f MB%s | %.1f s%s%s", rnd, num_rounds,
                " ".join(f"{s:02d}" for s in info["trained"]), info["train_loss"], info["val_loss"],
                info["val_accuracy"], info["val_weighted_f1"], info["val_macro_f1"], info["bytes_up"] / 1e6,
                info["bytes_down"] / 1e6, eps_note, info["wall_s"], " *best*" if improved else "", eta)
            if store:
                store.save_round(info, global_arrays=arrays, best_arrays=self.best_arrays,
                                 sampler=self.sampler.get_state(), early_stopping=asdict(self.early_stopping))
            if self.early_stopping.should_stop:
                log(INFO, "early stopping after round %d: no improvement for %d rounds; best round %d", rnd,
                    self.early_stopping.bad_rounds, self.early_stopping.best_round)
                break
        result.arrays = self.best_arrays
        return result

    # ----- differential privacy
    def start_accounting(self, rounds_done: int) -> None:
        """The accountant's population (the connected training subjects the sampler draws from) and results.json's
        `privacy` block, its ε recomputed from the rounds already done (a resumed run continues the accounting; its
        population must be the one those rounds were sampled from)."""
        population = len(self.sampler.pool(self.subject_of_node.values()))
        if population < self.clients_per_round:
            raise FederationError(f"cannot sample {self.clients_per_round} clients: only {population} training "
                                  f"subjects are connected")
        before = (self.store.results.get("privacy") or {}) if self.store else {}
        earlier = (before.get("sampling") or {}).get("num_clients")
        if rounds_done and earlier is not None and earlier != population:
            raise FederationError(f"the run's first {rounds_done} round(s) sampled from {earlier} training subjects, "
                                  f"{population} are connected now: the privacy accounting assumes one population; "
                                  f"connect the same SuperNodes")
        self.dp.population = population
        self.privacy = self.dp.record(rounds_done)
        if self.store:
            self.store.results["privacy"] = self.privacy
        log(INFO, "differential privacy: %s, z %g, clip %g, %d of %d subjects per round, δ %g%s",
            self.privacy["mechanism"], self.dp.noise_multiplier, self.dp.clip, self.dp.clients, population,
            self.dp.delta, f", budget ε {self.dp.target_epsilon:g}" if self.dp.target_epsilon > 0 else "")

    def over_budget(self, server_round: int) -> bool:
        """Whether round `server_round` would take ε past `dp-target-epsilon` (then why is recorded in
        `privacy.stopped` and `stop_reason`). A budget that allows not even the first round is a config error."""
        if self.dp is None or not self.dp.target_epsilon > 0:
            return False
        eps = self.dp.epsilon(server_round)
        if eps <= self.dp.target_epsilon:
            return False
        if server_round == 1:
            raise ConfigError(f"run-config key 'dp-target-epsilon' = {self.dp.target_epsilon:g} allows no round: "
                              f"one round already reaches ε={eps:.3g} (δ {self.dp.delta:g})")
        self.stop_reason = self.privacy["stopped"] = (f"budget: round {server_round} would reach ε={eps:.3g} > "
                                                      f"{self.dp.target_epsilon:g}")
        log(INFO, "privacy budget: stopping before round %d, which would reach ε=%.3g > dp-target-epsilon=%g "
            "(δ %g)", server_round, eps, self.dp.target_epsilon, self.dp.delta)
        return True

    # ----- after the run
    def personalized_evaluation(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord,
                                timeout: float) -> dict[str, Any]:
        """Every connected training client evaluates on its held-out windows (`personal-eval-fraction`): its
        personalized model (`personal_eval`: "finetune" = the global model after one local epoch, the standard
        baseline, or "own" = the model the strategy keeps on the node) and, for "finetune", the global model as
        it is. Returns the pooled figures over all clients' held-out windows and each subject's."""
        from model import classification_metrics

        if not self.subject_of_node:
            self.discover(grid, timeout)
        node_of = {s: n for n, s in self.subject_of_node.items()}
        cfg = ConfigRecord({**dict(config), "personal-eval": self.personal_eval})
        msgs = [Message(content=RecordDict({"arrays": arrays, "config": cfg}), message_type=MessageType.EVALUATE,
                        dst_node_id=node_of[s]) for s in sorted(node_of)]
        t0 = time.time()
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        sent_to = {m.metadata.message_id: self.subject_of_node[m.metadata.dst_node_id] for m in msgs}  # ids: sent
        parts: dict[int, dict[str, np.ndarray]] = {}
        per_subject: dict[str, dict[str, float]] = {}
        failures, never_trained = [], []
        for reply in replies:
            subject = sent_to.get(reply.metadata.reply_to_message_id, -1)
            if reply.has_error():
                failures.append({"subject": subject, "reason": str(reply.error.reason)})
                continue
            parts[subject] = arrays_to_numpy(reply.content["arrays"])
            met = dict(_metrics(reply))
            per_subject[str(subject)] = {k: float(v) for k, v in met.items() if k.endswith("_f1")}
            if met.get("never_trained"):
                never_trained.append(subject)
        answered = set(parts) | {f["subject"] for f in failures}
        failures += [{"subject": s, "reason": f"no reply within {timeout:.0f} s"} for s in sorted(node_of)
                     if s not in answered]
        if not parts:
            raise FederationError(f"personalized evaluation: no client answered ({failures})")
        for f in failures:
            log(WARNING, "personalized evaluation: subject %02d failed: %s", f["subject"], f["reason"])
        order = sorted(parts)
        labels = np.concatenate([parts[s]["labels"] for s in order])
        out: dict[str, Any] = {"method": self.personal_eval, "fraction": self.cfg.personal_eval_fraction,
                               "subjects": order, "num_examples": int(len(labels)), "per_subject": per_subject,
                               "failures": failures, "never_trained": sorted(never_trained),
                               "wall_s": time.time() - t0}
        for name in ("global", "personal"):
            if all(f"probs-{name}" in parts[s] for s in order):
                m = classification_metrics(labels, np.concatenate([parts[s][f"probs-{name}"] for s in order]), 7)
                out[name] = {k: m[k] for k in ("accuracy", "weighted_f1", "macro_f1")}
        log(INFO, "personalized evaluation (%s) on %d clients' held-out windows: %s", self.personal_eval, len(order),
            " | ".join(f"{n} wF1 {out[n]['weighted_f1']:.4f} mF1 {out[n]['macro_f1']:.4f}"
                       for n in ("global", "personal") if n in out))
        return out

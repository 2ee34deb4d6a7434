"""The run config: one frozen dataclass of the shared settings, read and checked once, for every way of training.

`pyproject.toml` `[tool.flwr.app.config]` is the single source of defaults; the same hyphenated keys are accepted
by `flwr run --run-config`, by `python -m model.train --run-config` and by the benches. Shared settings are the
flat keys, grouped in `SECTIONS`; a strategy's own parameters live in its table (`[tool.flwr.app.config.fedprox]`,
keys `fedprox.proximal-mu`, ...), which this module keeps as given: the strategy declares, reads and checks
them (`server_app/strategies/`). Imports neither Flower nor torch, so the ClientApp, the centralized trainer and
the tests share it cheaply.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from data_partition.constants import MODALITIES


class ConfigError(ValueError):
    """A run-config key is unknown, ill-typed or out of range."""


def key(default: Any, *, ge: float | None = None, gt: float | None = None, lt: float | None = None,
        le: float | None = None, choices: tuple | None = None) -> Any:
    """A run-config field with its declared range or choices (checked by `check_fields`)."""
    limits = {"ge": ge, "gt": gt, "lt": lt, "le": le, "choices": choices}
    return field(default=default, metadata={k: v for k, v in limits.items() if v is not None})


def check_fields(obj: Any, prefix: str = "") -> None:
    """Every field of a dataclass built with `key`: finite numbers, declared ranges and choices."""
    for f in fields(obj):
        name, value, meta = prefix + f.name.replace("_", "-"), getattr(obj, f.name), f.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"run-config key '{name}' must be a finite number, got {value}")
        bounds = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                  ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<="))
        for limit, ok, sign in bounds:
            if limit in meta and not ok(value, meta[limit]):
                raise ConfigError(f"run-config key '{name}' must be {sign} {meta[limit]}, got {value}")
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"run-config key '{name}' must be one of {sorted(meta['choices'])}, got '{value}'")


def coerce_fields(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Hyphenated run-config keys -> field values of dataclass `cls`, each of exactly the TOML type it allows;
    an unknown key is refused with the known ones listed."""
    known = {f.name.replace("_", "-"): f for f in fields(cls) if not f.metadata.get("internal")}
    out: dict[str, Any] = {}
    for k, value in values.items():
        if k not in known:
            names = ", ".join(prefix + n for n in sorted(known)) or "none"
            raise ConfigError(f"unknown run-config key '{prefix}{k}' (known keys: {names})")
        out[known[k].name] = _coerce(prefix + k, value, known[k].type)
    return out


# model presets, fusions and normalisations, named here so that checking a config imports no torch
# (tests/server/test_config.py checks them against the model package)
PRESET_NAMES = ("paper", "compact", "tiny")
FUSION_NAMES = ("magnet", "concat", "attention", "lstm", "dart")


@dataclass(frozen=True)
class RunConfig:
    """The shared settings of a run; `strategy_options` holds every strategy table as given (`from_run_config`)."""

    # protocol (the paper's budget)
    num_server_rounds: int = key(10, ge=1)
    local_epochs: int = key(5, ge=1)
    clients_per_round: int = key(9, ge=1)
    min_train_replies: int = key(1, ge=1)
    round_timeout: float = key(3600.0, gt=0)
    discovery_timeout: float = key(30.0, gt=0)  # seconds to wait for clients-per-round SuperNodes to connect
    patience: int = key(6, ge=0)
    average_last_rounds: int = key(0, ge=0)  # > 0: the final model is the mean of the last N rounds' global models
    split_seed: int = 42
    seed: int = 0
    strategy: str = "fedavg"  # a name of server_app.strategies.STRATEGIES (checked where they are registered)
    modality_aware_averaging: bool = False
    personal_eval_fraction: float = key(0.0, ge=0, lt=0.5)  # > 0: clients hold out this share of their windows
    # training (one client's local training, and the centralized trainer)
    batch_size: int = key(8, ge=1)
    grad_accum: int = key(6, ge=1)
    micro_batch: int = key(0, ge=0)  # windows per forward pass; 0 = the whole optimizer batch (batch-size x grad-accum)
    lr: float = key(0.0, ge=0)  # 0 = the model preset's own (compact 1e-3, paper 1e-4)
    weight_decay: float = key(1e-4, ge=0)
    augment_sigma: float = key(0.01, ge=0)
    modality_dropout: float = key(0.0, ge=0, lt=1)
    unimodal_weight: float = key(0.0, ge=0)
    # model
    model_preset: str = key("compact", choices=PRESET_NAMES)
    fusion: str = key("magnet", choices=FUSION_NAMES)
    modalities: str = "act,acw,dc,pm"
    acc_window_stats: bool = True
    acc_window_stats_norm: bool = False
    # data
    data_path: str = ""
    normalization: str = key("subject", choices=("global", "per_window", "subject"))
    # scenario (seeded by `seed`): missing modalities and poisoned clients
    missing_rate: float = key(0.0, ge=0, lt=1)
    missing_at_eval: bool = False
    absent_modalities: str = ""
    absent_fraction: float = key(0.0, ge=0, le=1)
    poison: str = key("none", choices=("none", "label-flip", "scale"))
    poison_clients: int = key(0, ge=0)
    poison_scale: float = 10.0
    labeled_fraction: float = key(1.0, gt=0, le=1)  # share of each client's training windows that keeps its label
    # privacy: user-level differential privacy of the weighted-mean strategies (docs/privacy.md)
    dp_noise_multiplier: float = key(0.0, ge=0)  # z; 0 = DP off
    dp_clip: float = key(4.0, gt=0)  # C: L2 norm a client's update is clipped to
    dp_noise: str = key("server", choices=("server", "client"))  # who adds the Gaussian noise
    dp_delta: float = key(1e-5, gt=0, lt=1)
    dp_target_epsilon: float = key(0.0, ge=0)  # > 0: stop before a round that would exceed this ε
    # outputs
    output_dir: str = "outputs"
    run_name: str = ""
    resume: str = ""
    tensorboard: bool = True  # false: no TensorBoard event files (fedtime/tracking.py)
    # resources
    num_threads: int = key(1, ge=1)
    amp: str = key("off", choices=("off", "auto", "bf16", "fp16"))
    eval_batch_size: int = key(64, ge=1)
    eval_bn_stats: str = key("subject", choices=("global", "subject"))
    # strategy tables, e.g. {"fedprox": {"proximal-mu": 0.01}}: checked by the strategies, not here
    strategy_options: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}),
                                                             compare=False, metadata={"internal": True})

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's run config (hyphenated keys, strategy tables flattened to `name.key`); every shared
        key checked before training starts."""
        shared, tables = {}, {}
        for k, value in run_config.items():
            if "." in k:
                table, _, sub = k.partition(".")
                tables.setdefault(table, {})[sub] = value
            else:
                shared[k] = value
        values = coerce_fields(cls, shared)
        options = MappingProxyType({t: MappingProxyType(v) for t, v in tables.items()})
        cfg = cls(**values, strategy_options=options)
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        """The flat run config (strategy tables as dotted keys), as Flower passes it."""
        flat = {_key(f.name): getattr(self, f.name) for f in fields(self) if not f.metadata.get("internal")}
        flat.update({f"{t}.{k}": v for t, table in self.strategy_options.items() for k, v in table.items()})
        return flat

    def replace(self, **changes: Any) -> "RunConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def options_of(self, strategy: str) -> dict[str, Any]:
        """The run config's table of one strategy (hyphenated keys, as given)."""
        return dict(self.strategy_options.get(strategy, {}))

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        check_fields(self)
        absent = self.absent_modality_list
        if any(m not in MODALITIES for m in absent) or len(set(absent)) != len(absent):
            raise ConfigError(f"run-config key 'absent-modalities' must be a comma-separated subset of "
                              f"{','.join(MODALITIES)}, got '{self.absent_modalities}'")
        if absent and not set(self.modality_list) - set(absent):
            raise ConfigError("run-config key 'absent-modalities' would leave clients without any modality")
        if self.poison != "none" and self.poison_clients < 1:
            raise ConfigError(f"run-config key 'poison' is '{self.poison}' but 'poison-clients' is 0")
        if self.micro_batch and self.optimizer_batch % self.micro_batch:
            raise ConfigError(f"run-config key 'micro-batch' must be 0 or divide batch-size x grad-accum = "
                              f"{self.optimizer_batch}, got {self.micro_batch}")
        if self.min_train_replies > self.clients_per_round:
            raise ConfigError("run-config key 'min-train-replies' cannot exceed 'clients-per-round'")
        mods = self.modality_list
        unknown = [m for m in mods if m not in MODALITIES]
        if unknown or not mods or len(set(mods)) != len(mods):
            raise ConfigError(f"run-config key 'modalities' must be a comma-separated subset of "
                              f"{','.join(MODALITIES)} without repeats, got '{self.modalities}'")
        if self.acc_window_stats_norm and not self.acc_window_stats:
            raise ConfigError("run-config key 'acc-window-stats-norm' normalises the window statistics: "
                              "it needs 'acc-window-stats = true'")

    # ---------------------------------------------------------------- derived
    @property
    def learning_rate(self) -> float:
        """`lr`, or with `lr = 0` the model preset's own."""
        if self.lr:
            return self.lr
        from model.config import PRESETS

        return PRESETS[self.model_preset].lr

    @property
    def optimizer_batch(self) -> int:
        """Windows per optimizer step: the paper's batch 8 x 6-step accumulation = 48."""
        return self.batch_size * self.grad_accum

    @property
    def forward_batch(self) -> int:
        """Windows per forward pass (`micro-batch`, 0 = the whole optimizer batch)."""
        return self.micro_batch or self.optimizer_batch

    @property
    def modality_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.modalities.split(",") if m.strip())

    @property
    def absent_modality_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.absent_modalities.split(",") if m.strip())

    @property
    def model_options(self) -> dict[str, bool | str]:
        """What `build_model` needs beyond preset, fusion and modalities from the shared keys (a strategy may
        add its own: `Strategy.model_options`)."""
        return {"unimodal_heads": self.unimodal_weight > 0, "ts_window_stats": self.acc_window_stats,
                "ts_window_stats_norm": self.acc_window_stats_norm}

    def data_source(self) -> str | None:
        """Configured data path, else $FEDTIME_DATA_PATH, else None (= download / user cache)."""
        return self.data_path or os.environ.get("FEDTIME_DATA_PATH") or None


#: The shared keys by what they configure (docs and the centralized trainer read it); every field is in one.
SECTIONS: dict[str, tuple[str, ...]] = {
    "protocol": ("num-server-rounds", "local-epochs", "clients-per-round", "min-train-replies", "round-timeout",
                 "discovery-timeout", "patience", "average-last-rounds", "split-seed", "seed", "strategy",
                 "modality-aware-averaging", "personal-eval-fraction"),
    "training": ("batch-size", "grad-accum", "micro-batch", "lr", "weight-decay", "augment-sigma",
                 "modality-dropout", "unimodal-weight"),
    "model": ("model-preset", "fusion", "modalities", "acc-window-stats", "acc-window-stats-norm"),
    "data": ("data-path", "normalization"),
    "scenario": ("missing-rate", "missing-at-eval", "absent-modalities", "absent-fraction", "poison",
                 "poison-clients", "poison-scale", "labeled-fraction"),
    "privacy": ("dp-noise-multiplier", "dp-clip", "dp-noise", "dp-delta", "dp-target-epsilon"),
    "outputs": ("output-dir", "run-name", "resume", "tensorboard"),
    "resources": ("num-threads", "amp", "eval-batch-size", "eval-bn-stats"),
}

#: Keys that only a federation has: the centralized trainer refuses them unless they keep their default (the
#: paper's file sets some) — rounds, sampling, strategies, the scenarios that are drawn per client and user-level
#: differential privacy.
FEDERATED_ONLY = ("num-server-rounds", "local-epochs", "clients-per-round", "min-train-replies", "round-timeout",
                  "discovery-timeout", "average-last-rounds", "strategy", "modality-aware-averaging",
                  "personal-eval-fraction",
                  *SECTIONS["scenario"], *SECTIONS["privacy"], "resume")


def parse_run_config(texts: "list[str] | tuple[str, ...]") -> dict[str, Any]:
    """Run-config overrides as `flwr run --run-config` takes them: each text a TOML file (`conf/paper.toml`)
    or inline `key=value ...` pairs with TOML values; later texts win; tables flatten to dotted keys. Keys are not
    checked here (RunConfig and the strategies do)."""
    import shlex
    import tomllib

    values: dict[str, Any] = {}
    for text in texts:
        if text.endswith(".toml"):
            if not os.path.isfile(text):
                raise ConfigError(f"no such file: {text}")
            with open(text, "rb") as f:
                values.update(flatten_tables(tomllib.load(f)))
            continue
        for item in shlex.split(text, posix=False):  # keep quotes: values are TOML, as for flwr run
            k, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"expected key=value, got '{item}'")
            try:
                values[k.strip()] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"the value of '{k}' is not a TOML value: {raw} (strings need quotes)") from None
    return values


def flatten_tables(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, Mapping):
            out.update(flatten_tables(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, value: Any, type_name: str) -> Any:
    """Accept exactly the TOML types a key allows (an int where a float is expected is fine)."""
    if type_name == "bool":
        if isinstance(value, bool):
            return value
    elif type_name == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif type_name == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif type_name == "str":
        if isinstance(value, str):
            return value
    raise ConfigError(f"run-config key '{name}' must be of type {type_name}, got {value!r} ({type(value).__name__})")

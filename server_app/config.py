"""One dataclass for the run config, validated once before any training.

`pyproject.toml` `[tool.flwr.app.config]` is the single source of defaults; the same keys (hyphenated) are
accepted by `--run-config`, and this module turns them into a typed, checked `RunConfig`. Imports neither
Flower nor torch so that the centralized CLI, the ClientApp and the tests can share it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

MODALITIES = ("act", "acw", "dc", "pm")


class ConfigError(ValueError):
    """A run-config key is unknown, ill-typed or out of range."""


@dataclass(frozen=True)
class RunConfig:
    # protocol (paper values)
    num_server_rounds: int = 10
    local_epochs: int = 5
    clients_per_round: int = 9
    batch_size: int = 8
    grad_accum: int = 6
    micro_batch: int = 0  # windows per forward pass; 0 = the whole optimizer batch (batch-size x grad-accum)
    lr: float = 0.0  # 0 = the model preset's own (compact 1e-3, paper 1e-4)
    weight_decay: float = 1e-4
    patience: int = 6
    average_last_rounds: int = 0  # > 0: the final model is the mean of the last N rounds' global models
    # model
    model_preset: str = "compact"
    fusion: str = "magnet"
    modalities: str = "act,acw,dc,pm"
    acc_window_stats: bool = True
    acc_window_stats_norm: bool = False
    # federation
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    trim_beta: float = 0.2
    num_malicious: int = 1
    modality_aware_averaging: bool = False
    split_seed: int = 42
    seed: int = 0
    min_train_replies: int = 1
    round_timeout: float = 3600.0
    # FedMobile-style aggregation (strategy "fedmobile")
    fedmobile_samples_weight: float = 1.0
    fedmobile_perf_weight: float = 1.0
    fedmobile_gain_weight: float = 1.0
    local_val_fraction: float = 0.1
    generator_weight: float = 1.0
    generator_objective: str = "embedding"
    shapley_clusters: int = 3
    proxy_windows: int = 256
    # scenarios (seeded by `seed`): missing modalities and poisoned clients
    missing_rate: float = 0.0
    missing_at_eval: bool = False
    absent_modalities: str = ""
    absent_fraction: float = 0.0
    poison: str = "none"
    poison_clients: int = 0
    poison_scale: float = 10.0
    # data
    data_path: str = ""
    normalization: str = "subject"
    augment_sigma: float = 0.01
    modality_dropout: float = 0.0
    unimodal_weight: float = 0.0
    # outputs
    output_dir: str = "outputs"
    run_name: str = ""
    resume: str = ""
    # resources
    num_threads: int = 1
    amp: str = "off"
    eval_batch_size: int = 64
    eval_bn_stats: str = "subject"

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's run config (hyphenated keys); every key checked before training starts."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in known:
                raise ConfigError(f"unknown run-config key '{key}' (known keys: {', '.join(sorted(known))})")
            f = known[key]
            values[f.name] = _coerce(key, value, f.type)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> "RunConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        positive = ("num_server_rounds", "local_epochs", "clients_per_round", "batch_size", "grad_accum",
                    "num_threads", "eval_batch_size", "min_train_replies", "shapley_clusters", "proxy_windows")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"run-config key '{_key(name)}' must be >= 1, got {getattr(self, name)}")
        if self.lr < 0:
            raise ConfigError(f"run-config key 'lr' must be > 0 (or 0: the model preset's own), got {self.lr}")
        if not self.round_timeout > 0:
            raise ConfigError(f"run-config key 'round-timeout' must be > 0, got {self.round_timeout}")
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"run-config key 'trim-beta' must be in [0, 0.5), got {self.trim_beta}")
        for name in ("weight_decay", "proximal_mu", "augment_sigma", "num_malicious", "fedmobile_samples_weight",
                     "fedmobile_perf_weight", "fedmobile_gain_weight", "generator_weight", "poison_clients",
                     "unimodal_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run-config key '{_key(name)}' must be >= 0, got {getattr(self, name)}")
        if not (self.fedmobile_samples_weight + self.fedmobile_perf_weight + self.fedmobile_gain_weight) > 0:
            raise ConfigError("run-config keys 'fedmobile-samples-weight', 'fedmobile-perf-weight' and "
                              "'fedmobile-gain-weight' cannot all be 0")
        if not 0 <= self.modality_dropout < 1:
            raise ConfigError(f"run-config key 'modality-dropout' must be in [0, 1), got {self.modality_dropout}")
        if not 0 <= self.absent_fraction <= 1:
            raise ConfigError(f"run-config key 'absent-fraction' must be in [0, 1], got {self.absent_fraction}")
        if not 0 <= self.missing_rate < 1:
            raise ConfigError(f"run-config key 'missing-rate' must be in [0, 1), got {self.missing_rate}")
        if not 0 <= self.local_val_fraction < 0.5:
            raise ConfigError(f"run-config key 'local-val-fraction' must be in [0, 0.5), got {self.local_val_fraction}")
        absent = self.absent_modality_list
        if any(m not in MODALITIES for m in absent) or len(set(absent)) != len(absent):
            raise ConfigError(f"run-config key 'absent-modalities' must be a comma-separated subset of "
                              f"{','.join(MODALITIES)}, got '{self.absent_modalities}'")
        if absent and not set(self.modality_list) - set(absent):
            raise ConfigError("run-config key 'absent-modalities' would leave clients without any modality")
        _check_choice("poison", self.poison, ("none", "label-flip", "scale"))
        _check_choice("amp", self.amp, ("off", "auto", "bf16", "fp16"))
        if self.poison != "none" and self.poison_clients < 1:
            raise ConfigError(f"run-config key 'poison' is '{self.poison}' but 'poison-clients' is 0")
        if self.micro_batch < 0 or (self.micro_batch and self.optimizer_batch % self.micro_batch):
            raise ConfigError(f"run-config key 'micro-batch' must be 0 or divide batch-size x grad-accum = "
                              f"{self.optimizer_batch}, got {self.micro_batch}")
        if self.average_last_rounds < 0:
            raise ConfigError(f"run-config key 'average-last-rounds' must be >= 0, got {self.average_last_rounds}")
        if self.patience < 0:
            raise ConfigError(f"run-config key 'patience' must be >= 0, got {self.patience}")
        if self.min_train_replies > self.clients_per_round:
            raise ConfigError("run-config key 'min-train-replies' cannot exceed 'clients-per-round'")
        mods = self.modality_list
        unknown = [m for m in mods if m not in MODALITIES]
        if unknown or not mods or len(set(mods)) != len(mods):
            raise ConfigError(f"run-config key 'modalities' must be a comma-separated subset of "
                              f"{','.join(MODALITIES)} without repeats, got '{self.modalities}'")
        _check_choice("normalization", self.normalization, ("global", "per_window", "subject"))
        if self.acc_window_stats_norm and not self.acc_window_stats:
            raise ConfigError("run-config key 'acc-window-stats-norm' normalises the window statistics: "
                              "it needs 'acc-window-stats = true'")
        _check_choice("eval-bn-stats", self.eval_bn_stats, ("global", "subject"))
        _check_choice("generator-objective", self.generator_objective, _generator_objectives())
        if self.generator_objective != "embedding" and not self.latent_generators:
            raise ConfigError(f"run-config key 'generator-objective' applies to the latent generators of strategy "
                              f"'fedmobile', not to '{self.strategy}'")
        _check_choice("model-preset", self.model_preset, _model_presets())
        _check_choice("fusion", self.fusion, _fusions())
        _check_choice("strategy", self.strategy, _strategies())
        if self.modality_aware_averaging and not _strategies()[self.strategy].weighted_mean:
            raise ConfigError(f"run-config key 'modality-aware-averaging' applies to the weighted-mean strategies, "
                              f"not to '{self.strategy}'")

    # ---------------------------------------------------------------- derived
    @property
    def learning_rate(self) -> float:
        """`lr`, or with `lr = 0` the model preset's own (imports the model package)."""
        if self.lr:
            return self.lr
        from model import PRESETS

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
    def latent_generators(self) -> bool:
        """FedMobile-style runs reconstruct missing modalities' embeddings with generators."""
        return self.strategy == "fedmobile"

    @property
    def model_options(self) -> dict[str, bool | str]:
        """What `build_model` needs beyond preset, fusion and modalities, for every party alike."""
        return {"latent_generators": self.latent_generators, "unimodal_heads": self.unimodal_weight > 0,
                "ts_window_stats": self.acc_window_stats, "ts_window_stats_norm": self.acc_window_stats_norm,
                "generator_objective": self.generator_objective}

    def data_source(self) -> str | None:
        """Configured data path, else $FEDTIME_DATA_PATH, else None (= download / user cache)."""
        return self.data_path or os.environ.get("FEDTIME_DATA_PATH") or None

    def train_config(self, epochs: int | None = None):
        """The model's TrainConfig with this run's values: one loop for centralized and federated. Its
        `batch_size` is the forward pass's (build the training loader with it) and `grad_accum` the forward passes
        per optimizer step, so every micro-batch setting takes the same optimizer steps of `optimizer_batch`
        windows."""
        from model import TrainConfig

        return TrainConfig(lr=self.learning_rate, weight_decay=self.weight_decay, batch_size=self.forward_batch,
                           grad_accum=self.optimizer_batch // self.forward_batch, epochs=epochs or self.local_epochs,
                           patience=self.patience, generator_weight=self.generator_weight, amp=self.amp,
                           modality_dropout=self.modality_dropout, unimodal_weight=self.unimodal_weight)


def parse_run_config(texts: "list[str] | tuple[str, ...]") -> dict[str, Any]:
    """Run-config overrides as `flwr run --run-config` takes them: each text a TOML file (`conf/paper.toml`)
    or inline `key=value ...` pairs with TOML values; later texts win. Keys are not checked here (RunConfig does)."""
    import shlex
    import tomllib

    values: dict[str, Any] = {}
    for text in texts:
        if text.endswith(".toml"):
            if not os.path.isfile(text):
                raise ConfigError(f"no such file: {text}")
            with open(text, "rb") as f:
                values.update(tomllib.load(f))
            continue
        for item in shlex.split(text, posix=False):  # keep quotes: values are TOML, as for flwr run
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"expected key=value, got '{item}'")
            try:
                values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"the value of '{key}' is not a TOML value: {raw} (strings need quotes)") from None
    return values


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, type_name: str) -> Any:
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
    raise ConfigError(f"run-config key '{key}' must be of type {type_name}, got {value!r} ({type(value).__name__})")


def _check_choice(key: str, value: str, choices) -> None:
    if choices is not None and value not in choices:
        raise ConfigError(f"run-config key '{key}' must be one of {sorted(choices)}, got '{value}'")


def _model_presets():
    try:
        from model import PRESETS
    except ImportError:
        return None
    return PRESETS


def _fusions():
    try:
        from model import FUSIONS
    except ImportError:
        return None
    return FUSIONS


def _generator_objectives():
    try:
        from model.generators import OBJECTIVES
    except ImportError:
        return None
    return OBJECTIVES


def _strategies():
    from server_app.strategy import STRATEGIES

    return STRATEGIES

"""The strategy registry: one file per strategy, one line here (docs/architecture.md, "Add a strategy")."""

from __future__ import annotations

from typing import Any

from fedtime.config import ConfigError, RunConfig
from server_app.strategies.fedavg import (ClientReply, ClientSampler, EarlyStopping, FederationError, MagnetFedAvg,
                                          weighted_average)
from server_app.strategies.fedavg_slr import MagnetFedAvgSLR
from server_app.strategies.fedepa import MagnetFedEPA
from server_app.strategies.fedmfs import MagnetFedMFS
from server_app.strategies.fedmobile import MagnetFedMobile
from server_app.strategies.fedprox import MagnetFedProx
from server_app.strategies.robust import MagnetFedMedian, MagnetFedTrimmedAvg, MagnetKrum

STRATEGIES: dict[str, type[MagnetFedAvg]] = {}


def register(cls: type[MagnetFedAvg]) -> type[MagnetFedAvg]:
    """Add a strategy under its `name` (usable as a class decorator)."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"strategy name '{cls.name}' is taken by {STRATEGIES[cls.name].__name__}")
    STRATEGIES[cls.name] = cls
    return cls


register(MagnetFedAvg)
register(MagnetFedProx)
register(MagnetFedMobile)
register(MagnetFedMedian)
register(MagnetFedTrimmedAvg)
register(MagnetKrum)
register(MagnetFedAvgSLR)
register(MagnetFedMFS)
register(MagnetFedEPA)


def check_strategy_options(cfg: RunConfig) -> None:
    """Every strategy table of the run config names a registered strategy and holds only its keys, well typed and
    in range (the defaults carry every strategy's table, so a misspelling anywhere is refused, not ignored); the
    chosen strategy accepts the shared keys set (`MagnetFedAvg.check_shared_keys`)."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"run-config key 'strategy' must be one of {sorted(STRATEGIES)}, got '{cfg.strategy}'")
    for table in cfg.strategy_options:
        if table not in STRATEGIES:
            raise ConfigError(f"run-config table '{table}' names no strategy (strategies: {sorted(STRATEGIES)})")
        STRATEGIES[table].read_params(cfg)
    STRATEGIES[cfg.strategy].check_shared_keys(cfg)  # e.g. DP with a robust strategy, before any data is read


def build_strategy(cfg: RunConfig, *, split: Any, store: Any = None) -> MagnetFedAvg:
    """The run config's strategy, built from its own table, over the split's subjects."""
    check_strategy_options(cfg)
    return STRATEGIES[cfg.strategy].from_config(cfg, split=split, store=store)


__all__ = ["STRATEGIES", "ClientReply", "ClientSampler", "EarlyStopping", "FederationError", "MagnetFedAvg",
           "MagnetFedAvgSLR", "MagnetFedEPA", "MagnetFedMFS",
           "MagnetFedMedian", "MagnetFedMobile", "MagnetFedProx", "MagnetFedTrimmedAvg", "MagnetKrum",
           "build_strategy", "check_strategy_options", "register", "weighted_average"]

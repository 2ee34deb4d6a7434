"""A run's directory: results.json, checkpoints for resume, the best model.

Layout of `<output-dir>/<run>/`:
    results.json                 config, per-round history, best round, final test metrics: the schema of
                                 `fedtime.results` (mode "federated"), the one centralized runs write too
    best_model.safetensors       the best round's global trainable state
    checkpoint/global.safetensors, checkpoint/best.safetensors, checkpoint/state.json
    checkpoint/rounds/global-NNN.safetensors   the last `keep_rounds` rounds' global states (average-last-rounds)
    plots/*.png
Every file is written atomically (temp file + rename), so a killed run leaves the last completed round intact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

from fedtime.results import (atomic_write, best_entry, finish_results, new_results, read_results, write_json,
                             write_results)


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def save_arrays(path: Path, record: ArrayRecord | dict[str, np.ndarray], meta: dict | None = None) -> None:
    state = arrays_to_numpy(record) if isinstance(record, ArrayRecord) else record
    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp,
                                             metadata={k: str(v) for k, v in (meta or {}).items()}))


def load_arrays(path: Path) -> ArrayRecord:
    return numpy_to_arrays(load_file(str(path)))


class RunStore:
    """Owns one run directory; `resume=True` requires a checkpoint there and continues it."""

    def __init__(self, path: Path, config: dict[str, Any], *, resume: bool = False, keep_rounds: int = 0) -> None:
        self.path = Path(path)
        self.ckpt = self.path / "checkpoint"
        self.resume = resume
        self.keep_rounds = keep_rounds
        if resume:
            if not (self.ckpt / "state.json").exists():
                raise FileNotFoundError(f"cannot resume: no checkpoint at {self.ckpt / 'state.json'}")
            self.results = read_results(self.path / "results.json")  # a run of an earlier version: upgraded
            self._check_compatible(self.results["config"], config)
            for key in ("num-server-rounds", "patience"):  # may change between a run and its continuation
                if key in config:
                    self.results["config"][key] = config[key]
            self.results.setdefault("resumed_at", []).append(time.strftime("%Y-%m-%dT%H:%M:%S"))
        else:
            if (self.ckpt / "state.json").exists():
                raise FileExistsError(f"{self.path} already holds a run; pass resume=\"{self.path}\" to "
                                      f"continue it or choose another run-name")
            self.path.mkdir(parents=True, exist_ok=True)
            self.results = new_results("federated", self.path.name, config)
        self._t_start = time.time() - float(self.results.get("wall_time_s") or 0.0)

    @staticmethod
    def _check_compatible(old: dict, new: dict) -> None:
        keys = ("model-preset", "fusion", "modalities", "strategy", "split-seed", "seed", "clients-per-round",
                "local-epochs", "lr", "batch-size", "grad-accum", "micro-batch", "missing-rate", "missing-at-eval",
                "absent-modalities", "absent-fraction", "poison", "poison-clients", "poison-scale")
        diff = {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}
        if diff:
            raise ValueError(f"cannot resume with a different configuration: {diff}")

    # --------------------------------------------------------------- checkpoint
    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.resume:
            return None
        state = json.loads((self.ckpt / "state.json").read_text())
        rounds_done = state["round"]
        self.results["history"] = [r for r in self.results["history"] if r["round"] <= rounds_done]
        self.results["best"] = best_entry(self.results, state["early_stopping"]["best_round"])
        return {**state, "global": load_arrays(self.ckpt / "global.safetensors"),
                "best": load_arrays(self.ckpt / "best.safetensors")}

    def save_round(self, info: dict[str, Any], *, global_arrays: ArrayRecord, best_arrays: ArrayRecord,
                   sampler: list, early_stopping: dict[str, Any]) -> None:
        save_arrays(self.ckpt / "global.safetensors", global_arrays)
        if self.keep_rounds:
            save_arrays(self.round_path(info["round"]), global_arrays)
            for old in self.stored_rounds()[:-self.keep_rounds]:
                self.round_path(old).unlink()
        if early_stopping["best_round"] == info["round"] or not (self.ckpt / "best.safetensors").exists():
            save_arrays(self.ckpt / "best.safetensors", best_arrays)
        self.results["history"].append(info)
        self.results["best"] = best_entry(self.results, early_stopping["best_round"])
        self.results["wall_time_s"] = time.time() - self._t_start
        write_results(self.path / "results.json", self.results)
        # state.json last: it is the commit point of a round
        write_json(self.ckpt / "state.json", {"round": info["round"], "sampler": sampler,
                                              "early_stopping": early_stopping})

    def round_path(self, server_round: int) -> Path:
        return self.ckpt / "rounds" / f"global-{server_round:03d}.safetensors"

    def stored_rounds(self, up_to: int | None = None) -> list[int]:
        """Rounds whose global state is kept (ascending), those after `up_to` excluded (an uncommitted round)."""
        found = sorted(int(p.stem.split("-")[1]) for p in (self.ckpt / "rounds").glob("global-*.safetensors"))
        return [r for r in found if up_to is None or r <= up_to]

    def last_rounds_average(self, k: int) -> tuple[list[int], dict[str, np.ndarray]]:
        """(rounds, their sample-free uniform mean) of the last `k` committed rounds' global states."""
        state = json.loads((self.ckpt / "state.json").read_text())
        rounds = self.stored_rounds(up_to=state["round"])[-k:]
        if not rounds:
            raise FileNotFoundError(f"no stored round in {self.ckpt / 'rounds'}")
        states = [arrays_to_numpy(load_arrays(self.round_path(r))) for r in rounds]
        mean = {key: (sum(st[key].astype(np.float64) for st in states) / len(states)).astype(states[0][key].dtype)
                for key in states[0]}
        return rounds, mean

    # --------------------------------------------------------------- final
    def finish(self, *, status: str, test: dict[str, Any] | None, best_arrays: ArrayRecord | None,
               extra: dict[str, Any] | None = None, header: dict[str, str] | None = None) -> Path:
        """``test``: `fedtime.results.test_entry`; ``extra``: final_model, model (`fedtime.results.model_entry`),
        scenario. ``header``: the safetensors header of best_model.safetensors (`model.state.checkpoint_header`),
        so `model.model_from_checkpoint` can rebuild the model from it."""
        if best_arrays is not None:
            save_arrays(self.path / "best_model.safetensors", best_arrays,
                        meta=header)
        finish_results(self.results, status=status, test=test, wall_time_s=time.time() - self._t_start,
                       **(extra or {}))
        write_results(self.path / "results.json", self.results)
        return self.path / "results.json"

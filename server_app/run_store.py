"""A run's directory: results.json, checkpoints for resume, the best model.

Layout of `<output-dir>/<run>/`:
    results.json                 config, per-round history, best round, final test metrics: the schema of
                                 `fedtime.results` (mode "federated"), the one centralized runs write too
    best_model.safetensors       the best round's global trainable state
    checkpoint/global-NNN.safetensors, checkpoint/best-NNN.safetensors   the last committed round's global state
                                 and the best round's (NNN: their rounds)
    checkpoint/state.json        the commit point: the round, the files above, sampler and early-stopping state
    checkpoint/rounds/global-NNN.safetensors   the last `keep_rounds` rounds' global states (average-last-rounds)
    plots/*.png
    tensorboard/                 TensorBoard event files (run config `tensorboard`; `fedtime.tracking`): a round's
                                 scalars once it is committed, the test figures at the end
Every file is written atomically (temp file + rename), and a round's weights go to new files that only state.json,
written last, points to: a run killed at any moment resumes from the last committed round, with its weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

from data_partition.atomic import atomic_write
from fedtime.config import RunConfig
from fedtime.results import (best_entry, finish_results, new_results, read_results, write_json,
                             write_results)
from fedtime.tracking import Tracker


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def save_arrays(path: Path, record: ArrayRecord | dict[str, np.ndarray], meta: dict | None = None) -> None:
    state = arrays_to_numpy(record) if isinstance(record, ArrayRecord) else record
    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp,
                                             metadata={k: str(v) for k, v in (meta or {}).items()}))


def load_arrays(path: Path) -> ArrayRecord:
    try:
        return numpy_to_arrays(load_file(str(path)))
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file missing: {path}") from None
    except Exception as err:  # safetensors raises its own error types for truncated or overwritten files
        raise ValueError(f"checkpoint file {path} is unreadable ({type(err).__name__}: {err})") from None


#: Run-config keys a resumed run may change (they do not change the training of the remaining rounds); every other
#: difference is refused, naming the keys. Accepted changes are recorded in results.json (`resumed`).
RESUMABLE_CHANGES = ("num-server-rounds", "patience", "round-timeout", "discovery-timeout", "min-train-replies",
                     "resume", "run-name", "output-dir", "num-threads", "tensorboard")


class RunStore:
    """Owns one run directory; `resume=True` requires a checkpoint there and continues it. `tensorboard`: also
    write each committed round and the final figures as TensorBoard events (`fedtime.tracking`)."""

    def __init__(self, path: Path, config: dict[str, Any], *, resume: bool = False, keep_rounds: int = 0,
                 tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.ckpt = self.path / "checkpoint"
        self.resume = resume
        self.keep_rounds = keep_rounds
        if resume:
            if not (self.ckpt / "state.json").exists():
                raise FileNotFoundError(f"cannot resume: no checkpoint at {self.ckpt / 'state.json'}")
            self.results = read_results(self.path / "results.json")  # a run of an earlier version: upgraded
            changed = self._check_compatible(self.results["config"], config)
            self.results["config"].update({k: new for k, (_, new) in changed.items()})
            # keys this version added, at their defaults (`_check_compatible`), join the config unrecorded
            self.results["config"].update({k: v for k, v in config.items() if k not in self.results["config"]})
            self.results.setdefault("resumed", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                           "changed": {k: list(v) for k, v in changed.items()}})
        else:
            if (self.ckpt / "state.json").exists():
                raise FileExistsError(f"{self.path} already holds a run; pass resume=\"{self.path}\" to "
                                      f"continue it or choose another run-name")
            self.path.mkdir(parents=True, exist_ok=True)
            self.results = new_results("federated", self.path.name, config)
        self._t_start = time.time() - float(self.results.get("wall_time_s") or 0.0)
        done = json.loads((self.ckpt / "state.json").read_text())["round"] if resume else 0  # committed rounds
        self.tracker = Tracker(self.path, self.results["config"], enabled=tensorboard, step=done)

    @staticmethod
    def _check_compatible(old: dict, new: dict) -> dict[str, tuple]:
        """The changed keys {key: (old, new)} of a resumption, all in `RESUMABLE_CHANGES`; any other changed key
        (one that changes how the remaining rounds train or are scored) is refused, naming each. A key the run's
        config lacks (a run of an earlier version) that has its default now is no change: a new key's default keeps
        the behaviour the code had before it (e.g. `dp-noise-multiplier = 0`, no differential privacy)."""
        defaults = RunConfig().to_run_config()
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k) and not (k not in old and k in defaults and new.get(k) == defaults[k])}
        refused = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
        if refused:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise ValueError(f"cannot resume with a different configuration ({listed}); only "
                             f"{', '.join(RESUMABLE_CHANGES)} may change")
        return diff

    # --------------------------------------------------------------- checkpoint
    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.resume:
            return None
        state = json.loads((self.ckpt / "state.json").read_text())
        rounds_done = state["round"]
        self.results["history"] = [r for r in self.results["history"] if r["round"] <= rounds_done]
        self.results["best"] = best_entry(self.results, state["early_stopping"]["best_round"])
        # files of the committed round (a checkpoint of an earlier version has the fixed names)
        return {**state, "global": load_arrays(self.ckpt / state.get("global", "global.safetensors")),
                "best": load_arrays(self.ckpt / state.get("best", "best.safetensors"))}

    def save_round(self, info: dict[str, Any], *, global_arrays: ArrayRecord, best_arrays: ArrayRecord,
                   sampler: list, early_stopping: dict[str, Any]) -> None:
        """Round `info["round"]`: its weights into new files, results.json, then state.json, which points to those
        files, as the commit. Files of earlier rounds go only after the commit."""
        rnd, best_round = info["round"], early_stopping["best_round"]
        global_name, best_name = f"global-{rnd:03d}.safetensors", f"best-{best_round:03d}.safetensors"
        if best_round == rnd or not (self.ckpt / best_name).exists():  # else: committed with its round
            save_arrays(self.ckpt / best_name, best_arrays)
        save_arrays(self.ckpt / global_name, global_arrays)
        if self.keep_rounds:
            save_arrays(self.round_path(rnd), global_arrays)
        self.results["history"].append(info)
        self.results["best"] = best_entry(self.results, best_round)
        self.results["wall_time_s"] = time.time() - self._t_start
        write_results(self.path / "results.json", self.results)
        write_json(self.ckpt / "state.json", {"round": rnd, "global": global_name, "best": best_name,
                                              "sampler": sampler, "early_stopping": early_stopping})
        # committed: what the new state does not point to is stale
        for p in [*self.ckpt.glob("global*.safetensors"), *self.ckpt.glob("best*.safetensors")]:
            if p.name not in (global_name, best_name):
                p.unlink()
        self.tracker.row(info)  # after the commit: a resumed run never writes a round twice
        if self.keep_rounds:
            for old in self.stored_rounds()[:-self.keep_rounds]:
                self.round_path(old).unlink()

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
        self.tracker.finish(self.results)
        return self.path / "results.json"

"""The one schema of `results.json`, for federated runs (the ServerApp, through `server_app.run_store.RunStore`) and
centralized ones (`python -m model.train`): built and written here, and read back here by whoever reads a run
(`read_results`, which also upgrades the files earlier versions wrote). Imports no Flower, torch or numpy.

Version 2 (`SCHEMA_VERSION`). Top-level keys of both modes (`COMMON_KEYS`):

    schema_version  2
    mode            "federated" | "centralized"
    run             the run's name (its directory under output-dir)
    status          "running" (a federated run between rounds), "completed" (every round / epoch trained) or
                    "early_stopped" (patience ran out, or a federated run's privacy budget: `privacy.stopped`)
    config          the run config, hyphenated keys as `fedtime.config.RunConfig.to_run_config()` writes them
    history         one row per round (federated) or per epoch (centralized), in order. Every row has its integer
                    `round` (federated) or `epoch` (centralized) and the same metric names in both modes:
                    `train_loss`, `train_accuracy` (federated: the clients' sample-weighted mean) and
                    `val_loss`, `val_accuracy`, `val_weighted_f1`, `val_macro_f1` (the validation subjects).
                    Federated rows also have clients (sampled subjects), trained (those that replied), failures,
                    num_examples, bytes_down, bytes_up, bytes_up_by_subject (serialized bytes each client sent),
                    client_train_s, wall_s, best_round, epsilon (differentially private runs: ε after this round)
                    and, for some strategies, aggregation (what the strategy recorded: krum_selected, lacking,
                    FedMobile's weights, FedMFS's uploaded encoders and Shapley values...). Centralized rows also have lr, train_ce, train_aux (and train_<term> of the other
                    loss terms), train_samples, optimizer_steps, amp_skipped_steps, skipped_batches, train_time_s,
                    train_windows_per_s, epoch_time_s and best_epoch.
    best            the best validation round / epoch so far: {"round": n} (federated) or {"epoch": n}
                    (centralized), with that row's `val_loss`, `val_accuracy`, `val_weighted_f1`, `val_macro_f1`;
                    None before the first
    final_model     which model was tested: {"model": "best_round", "round": n} or {"model": "average_last_rounds",
                    "rounds": [...], val_*} (federated), {"model": "best_epoch", "epoch": n} or {"model": "swa",
                    "swa_epochs": k, val_*} (centralized); val_* are that model's validation figures; None while
                    a federated run is running
    test            None until the run ends (and in a run whose strategy keeps no global fusion and classifier:
                    FedMFS with `fedmfs.head = "local"`); then the tested model on the test subjects, the same block in both
                    modes (`TEST_KEYS`): loss, accuracy, weighted_f1, macro_f1 (with the BatchNorm statistics of
                    run config `eval-bn-stats`), per_class (sklearn's classification_report dict), confusion_matrix
                    (rows = true class), bn_stats ("global" | "subject", the statistics of those figures),
                    subjects (the test subjects), num_examples (test windows) and by_bn_stats: {"global": {loss,
                    accuracy, weighted_f1, macro_f1}, "subject": {...}}, the figures with each kind of statistics
    model           preset, fusion, modalities (list), trainable_params (values in the trainable state: trainable
                    parameters and BatchNorm statistics, what a client sends) and trainable_bytes (that state
                    serialized: federated, Flower's ArrayRecord bytes, what travels per client and direction;
                    centralized, safetensors bytes); centralized runs add config (the model's full configuration)
                    and params (total / trainable / frozen parameter counts); None while a federated run is
                    running
    wall_time_s     seconds the run took (federated: so far, across resumes)

Mode-specific top-level keys:

    federated       scenario (missing modalities, absent and poisoned subjects, labelled share: `Scenario.describe()`),
                    personalized (with `personal-eval-fraction` > 0: method "finetune" | "own", fraction, subjects,
                    num_examples, global / personal {accuracy, weighted_f1, macro_f1} pooled over the clients'
                    held-out windows, per_subject, failures, never_trained, wall_s),
                    resumed (one entry per resume: {"at": timestamp, "changed": {key: [old, new]}} of the
                    keys a resumption may change, server_app.run_store.RESUMABLE_CHANGES; only in resumed runs),
                    privacy (only with `dp-noise-multiplier` > 0; docs/privacy.md): mechanism ("gaussian,
                    user-level, noise at server" | "... at client"), clip (C), noise_multiplier (z),
                    noise_std_of_mean (z·C/m), sampling {clients_per_round (m), num_clients (N, the connected
                    training subjects), method "without-replacement", sampler "os-entropy"}, neighbouring
                    "replace-one", accountant, delta, epsilon (ε after each round, in order: the run's guarantee
                    is the last), target_epsilon (0: none), stopped (None, or why the budget stopped the run:
                    "budget: round 7 would reach ε=10.3 > 10")
    centralized     command, args (the CLI's arguments), subject_batches, train_config (the TrainConfig),
                    preprocess (the PreprocessConfig), split (train / val / test subjects), windows (per part),
                    class_weights, timing_s (data / train / total), env, artifacts

The benches add their own keys to the files of their cells (peak_rss_mib, sim_wall_s, wall_s, extended_from);
readers must ignore keys they do not know.

`read_results` returns every file in this shape: version 2 as written; a federated version-1 file
(`"schema_version": 1`: `rounds` -> history, `best_round` -> best, `model` gains preset / fusion / modalities from
its config); a centralized `"schema": "fedtime-magnet/central-v1"` file (`run_config` -> config, the integer-epoch
rows of `history` -> history and its SWA row -> final_model, `best_epoch` -> best, `test` + `bn_stats` +
`test_by_bn_stats` -> test, `model.params.trainable` / `bytes_trainable_state` -> trainable_params /
trainable_bytes (parameter count without BatchNorm statistics there), `timing_s.total` -> wall_time_s, status
"early_stopped" when fewer epochs than `train_config.epochs` ran, else "completed"; `val`, the tested model's
validation figures, dropped: the best epoch's row or the SWA row holds them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

SCHEMA_VERSION = 2
MODES = ("federated", "centralized")
STEP = {"federated": "round", "centralized": "epoch"}  # what one history row is, per mode
METRICS = ("loss", "accuracy", "weighted_f1", "macro_f1")  # validation (val_<m>) and test figures
COMMON_KEYS = ("schema_version", "mode", "run", "status", "config", "history", "best", "final_model", "test",
               "model", "wall_time_s")
TEST_KEYS = (*METRICS, "per_class", "confusion_matrix", "bn_stats", "subjects", "num_examples", "by_bn_stats")
MODEL_KEYS = ("preset", "fusion", "modalities", "trainable_params", "trainable_bytes")
CENTRAL_V1 = "fedtime-magnet/central-v1"


# --------------------------------------------------------------------------- building
def new_results(mode: str, run: str, config: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The skeleton of a run's results: every common key (history empty, the rest None until known) and the
    mode's own keys in `extra`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return {"schema_version": SCHEMA_VERSION, "mode": mode, "run": run, "status": "running", "config": dict(config),
            "history": [], "best": None, "final_model": None, "test": None, "model": None, "wall_time_s": None,
            **extra}


def best_entry(results: Mapping[str, Any], step: int | None) -> dict[str, Any] | None:
    """`best` for round / epoch `step` of `results["history"]`: the step and that row's validation figures."""
    if not step:
        return None
    key = STEP[results["mode"]]
    row = next((r for r in results["history"] if r.get(key) == step), {})
    return {key: step, **{f"val_{m}": row.get(f"val_{m}") for m in METRICS}}


def test_entry(metrics: Mapping[str, Any], *, bn_stats: str, subjects: Iterable[int],
               by_bn_stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The `test` block from `model.evaluate_per_subject`'s output with `bn_stats` statistics (`metrics`) and
    the outputs with each kind of statistics (`by_bn_stats`: "global" and "subject")."""
    return {**{m: float(metrics[m]) for m in METRICS}, "per_class": metrics["per_class"],
            "confusion_matrix": _plain(metrics["confusion_matrix"]), "bn_stats": bn_stats,
            "subjects": [int(s) for s in subjects], "num_examples": int(metrics["n"]),
            "by_bn_stats": {mode: {m: _float(by_bn_stats[mode].get(m)) for m in METRICS}
                            for mode in ("global", "subject") if mode in by_bn_stats}}


test_entry.__test__ = False  # a builder: pytest must not collect it where a test module imports it


def model_entry(*, preset: str, fusion: str, modalities: Iterable[str], trainable_params: int,
                trainable_bytes: int, **extra: Any) -> dict[str, Any]:
    """The `model` block; `extra`: a mode's own model keys (centralized: config, params)."""
    return {"preset": preset, "fusion": fusion, "modalities": list(modalities),
            "trainable_params": int(trainable_params), "trainable_bytes": int(trainable_bytes), **extra}


def finish_results(results: dict[str, Any], *, status: str, test: dict[str, Any] | None, wall_time_s: float,
                   **extra: Any) -> dict[str, Any]:
    """Fill the final part in place (status, test block, wall time, and `extra`: final_model, model, the mode's
    own keys); returns `results`."""
    results.update(status=status, test=test, wall_time_s=float(wall_time_s), **extra)
    return results


# --------------------------------------------------------------------------- writing
def _json_default(o: Any):
    if hasattr(o, "tolist"):  # numpy arrays and scalars, torch tensors
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
    from data_partition.atomic import atomic_write  # on use: reading a schema stays free of numpy

    atomic_write(Path(path), w)


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    if results.get("schema_version") != SCHEMA_VERSION or results.get("mode") not in MODES:
        raise ValueError("not a version-2 results dict: build it with fedtime.results.new_results")
    write_json(path, results)


# --------------------------------------------------------------------------- reading
def read_results(path: Path) -> dict[str, Any]:
    """A run's results.json in the version-2 shape, whichever version wrote it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return upgrade(json.loads(path.read_text()))


def upgrade(res: dict[str, Any]) -> dict[str, Any]:
    """`res` (a parsed results.json of any version) in the version-2 shape; a version-2 dict is returned as is."""
    version = res.get("schema_version")
    if version == SCHEMA_VERSION:
        return res
    if res.get("schema") == CENTRAL_V1:
        return _from_central_v1(res)
    if version == 1:
        return _from_federated_v1(res)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ValueError(f"results.json of schema version {version}: newer than this code's {SCHEMA_VERSION}")
    raise ValueError(f"not a results.json this project wrote (schema_version {version!r}, "
                     f"schema {res.get('schema')!r})")


def _from_federated_v1(res: dict[str, Any]) -> dict[str, Any]:
    old = dict(res)
    for key in ("schema_version", "rounds", "best_round"):
        old.pop(key, None)
    out = new_results("federated", res.get("run"), res.get("config") or {})
    out.update({k: v for k, v in old.items() if k != "config"})
    out["history"] = list(res.get("rounds") or [])
    out["best"] = best_entry(out, res.get("best_round"))
    if out["test"]:  # already the version-2 block; in its key order
        out["test"] = {**{k: out["test"][k] for k in TEST_KEYS if k in out["test"]}, **out["test"]}
    model = res.get("model")
    if model is not None:
        cfg = out["config"]
        out["model"] = model_entry(preset=cfg.get("model-preset"), fusion=cfg.get("fusion"),
                                   modalities=[m for m in str(cfg.get("modalities", "")).split(",") if m],
                                   **model)
    return out


def _from_central_v1(res: dict[str, Any]) -> dict[str, Any]:
    dropped = ("schema", "run_config", "history", "best_epoch", "val", "bn_stats", "test_by_bn_stats", "model",
               "test", "mode")
    rows = res.get("history") or []
    epochs = [h for h in rows if isinstance(h.get("epoch"), int)]
    swa = next((h for h in rows if h.get("epoch") == "swa"), None)
    best = res.get("best_epoch") or (epochs[-1].get("best_epoch") if epochs else None)
    out = new_results("centralized", res.get("run"), res.get("run_config") or {},
                      **{k: v for k, v in res.items() if k not in dropped and k not in COMMON_KEYS})
    out["history"] = epochs
    out["best"] = best_entry(out, best)
    if swa is not None:
        out["final_model"] = {"model": "swa", **{k: v for k, v in swa.items() if k != "epoch"}}
    else:
        out["final_model"] = {"model": "best_epoch", "epoch": best}
    epochs_asked = (res.get("train_config") or {}).get("epochs")
    out["status"] = "early_stopped" if epochs_asked and len(epochs) < epochs_asked else "completed"
    test = res.get("test")
    if test is not None:
        bn = res.get("bn_stats")
        by = {mode: {**({"loss": test.get("loss")} if mode == bn else {}), **figures}
              for mode, figures in (res.get("test_by_bn_stats") or {}).items()}
        out["test"] = test_entry(test, bn_stats=bn, subjects=(res.get("split") or {}).get("test", []),
                                 by_bn_stats=by)
    model = res.get("model")
    if model is not None:
        out["model"] = model_entry(preset=model.get("preset"), fusion=model.get("fusion"),
                                   modalities=model.get("modalities") or [],
                                   trainable_params=(model.get("params") or {}).get("trainable", 0),
                                   trainable_bytes=model.get("bytes_trainable_state", 0),
                                   **{k: model[k] for k in ("config", "params") if k in model})
    timing = res.get("timing_s") or {}
    out["wall_time_s"] = timing.get("total")
    return out


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def _plain(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else v

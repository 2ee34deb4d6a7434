"""Centralized training + evaluation on the paper split (21 train / 3 val / 6 test subjects).

    python -m model.train --preset compact --fusion magnet --modalities act,acw,dc,pm --seed 0 \
        --epochs 25 --lr 1e-3 --data-path /path/to/MEx.zip --output-dir outputs/central

Configured by the federated run's keys (pyproject.toml `[tool.flwr.app.config]`, validated by the same
`RunConfig`), through `--run-config "key=value ..."` or the shortcut flags; only epochs and centralized-only
options (monitor, label smoothing, modality dropout, subject batches) are separate flags.

Trains on the training subjects, selects the epoch on the validation subjects (early stopping
restores the best), evaluates the test subjects once, and writes ``<output-dir>/<run>/``:
``results.json``, ``best_model.safetensors``, ``learning_curves.png``, ``confusion_matrix.png``,
``pr_curves.png`` and, unless run config ``tensorboard = false``, TensorBoard events in ``tensorboard/``
(`fedtime.tracking`, the federated runs' tags). The input rates come from the model preset. results.json has the
schema of federated runs (`fedtime.results`, mode "centralized": one row per epoch in ``history``, the best epoch
in ``best``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import MODALITIES, get_config
from .network import build_model, count_parameters
from .plots import plot_confusion_matrix, plot_learning_curves, plot_pr_curves
from .state import save_checkpoint, state_nbytes, trainable_state
from .training import class_weights_from_labels, evaluate_per_subject, fit


# shortcut flag -> run-config key (pyproject.toml [tool.flwr.app.config]); every other key via --run-config
SHORTCUTS = {"--preset": "model-preset", "--fusion": "fusion", "--modalities": "modalities", "--seed": "seed",
             "--split-seed": "split-seed", "--data-path": "data-path", "--output-dir": "output-dir",
             "--run-name": "run-name", "--lr": "lr", "--weight-decay": "weight-decay", "--batch-size": "batch-size",
             "--grad-accum": "grad-accum", "--micro-batch": "micro-batch", "--patience": "patience", "--augment-sigma": "augment-sigma",
             "--normalization": "normalization", "--threads": "num-threads", "--bn-stats": "eval-bn-stats"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", action="append", default=[],
                    help="run-config keys as for `flwr run --run-config`: a TOML file (conf/paper.toml) or "
                         "\"lr=1e-3 model-preset='tiny'\"; may repeat, later ones win; defaults are pyproject.toml's")
    for flag, key in SHORTCUTS.items():
        ap.add_argument(flag, dest=key.replace("-", "_"), default=None, help=f"= run-config key '{key}'")
    ap.add_argument("--epochs", type=_positive_int, default=25)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--monitor", default="weighted_f1", help="validation metric: weighted_f1 | accuracy | macro_f1 | loss")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--swa-start", type=int, default=0,
                    help="> 0: train every epoch and keep the average of the weights from this epoch on (SWA)")

    ap.add_argument("--subject-batches", choices=["auto", "on", "off"], default="auto",
                    help="every training batch from one subject, as on a federated client (BatchNorm then learns "
                         "per-subject normalisation); auto = on when eval-bn-stats is 'subject'")
    ap.add_argument("--no-class-weights", action="store_true")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (smoke runs)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    return ap.parse_args(argv)


def run_config(args: argparse.Namespace):
    """The run's shared settings (`fedtime.config.RunConfig`, no Flower inside) from --run-config and the shortcut
    flags: one set of keys, defaults and checks for both ways of training. Keys only a federation has (rounds,
    strategies and their tables, scenarios) are refused unless they keep their default."""
    import tomllib

    from fedtime.config import FEDERATED_ONLY, ConfigError, RunConfig, parse_run_config

    try:
        values = parse_run_config(args.run_config)
    except ConfigError as e:
        raise SystemExit(f"--run-config: {e}") from None
    for flag, key in SHORTCUTS.items():
        given = getattr(args, key.replace("-", "_"))
        if given is not None:
            values[key] = given
    defaults = RunConfig()
    for key, value in list(values.items()):  # flags arrive as strings: read non-string keys as TOML values
        if isinstance(value, str) and not isinstance(getattr(defaults, key.replace("-", "_"), ""), str):
            try:
                values[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                pass  # RunConfig names the key and the type it expects
    values.setdefault("output-dir", "outputs/central")
    try:
        rc = RunConfig.from_run_config(values)
    except ConfigError as e:
        raise SystemExit(f"--run-config: {e}") from None
    default = defaults.to_run_config()
    federated = sorted(k for k, v in values.items()
                       if ("." in k or k in FEDERATED_ONLY) and (k not in default or v != default[k]))
    if federated:
        raise SystemExit(f"--run-config: python -m model.train trains centrally and cannot honour federated keys: "
                         f"{', '.join(f'{k}={values[k]!r}' for k in federated)} (epochs: --epochs)")
    return rc


def _loader(ds, batch_size: int, shuffle: bool, seed: int, workers: int):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      persistent_workers=workers > 0)


class SubjectBatchSampler(torch.utils.data.Sampler):
    """Batches of one subject each (windows shuffled within subjects, batches shuffled across them), a new
    order every epoch: centralized training that sees BatchNorm statistics the way federated clients do."""

    def __init__(self, subjects: np.ndarray, batch_size: int, seed: int):
        self.groups = [np.flatnonzero(subjects == s) for s in np.unique(subjects)]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        batches = [g[i:i + self.batch_size].tolist() for grp in self.groups
                   for g in [rng.permutation(grp)] for i in range(0, len(g), self.batch_size)]
        for j in rng.permutation(len(batches)):
            yield batches[j]

    def __len__(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups)


def build_results(run: str, rc, history: list[dict], *, test: dict, test_other: dict, subjects, epochs: int,
                  model: dict, wall_time_s: float, **extra) -> dict:
    """The results of a centralized run (`fedtime.results`, mode "centralized"; `extra`: its own top-level keys)
    from `fit`'s history (one row per epoch, then one for SWA when weights were averaged) and the test subjects'
    evaluations (`evaluate_per_subject`) with the run's BatchNorm statistics (`test`, run config eval-bn-stats)
    and with the other kind (`test_other`); `epochs`: the epochs asked for."""
    from fedtime import results as schema

    rows = [h for h in history if isinstance(h["epoch"], int)]
    swa = next((h for h in history if h["epoch"] == "swa"), None)
    best_epoch = rows[-1].get("best_epoch") if rows else None
    results = schema.new_results("centralized", run, rc.to_run_config(), **extra)
    results["history"] = rows
    results["best"] = schema.best_entry(results, best_epoch)
    final = ({"model": "swa", **{k: v for k, v in swa.items() if k != "epoch"}} if swa is not None
             else {"model": "best_epoch", "epoch": best_epoch})
    other = "global" if rc.eval_bn_stats == "subject" else "subject"
    return schema.finish_results(
        results, status="early_stopped" if len(rows) < epochs else "completed",
        test=schema.test_entry(test, bn_stats=rc.eval_bn_stats, subjects=subjects,
                               by_bn_stats={rc.eval_bn_stats: test, other: test_other}),
        wall_time_s=wall_time_s, final_model=final, model=model)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from fedtime import results as schema
    from fedtime import task, tracking

    rc = run_config(args)
    torch.set_num_threads(rc.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    mods = tuple(m for m in MODALITIES if m in rc.modality_list)
    cfg = get_config(rc.model_preset)
    run = rc.run_name or f"{rc.model_preset}-{rc.fusion}-{'+'.join(mods)}-s{rc.seed}"
    out = Path(rc.output_dir) / run
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(rc.seed)
    np.random.seed(rc.seed)
    subject_batches = args.subject_batches == "on" or (args.subject_batches == "auto" and rc.eval_bn_stats == "subject")

    t0 = time.perf_counter()
    pre = task.preprocess_config(rc)  # the input rates of the model preset, as a federated run reads them
    if args.cache_dir:
        os.environ["FEDTIME_CACHE_DIR"] = str(args.cache_dir)  # where task.open_data keeps the window cache
    _, split, _ = task.open_data(rc)
    # the datasets a federated run builds (fedtime.task.dataset): train-subject statistics, noise on training only
    train_ds = task.dataset(rc, split.train, train=True)
    val_ds = task.dataset(rc, split.val, train=False)
    test_ds = task.dataset(rc, split.test, train=False)
    t_data = time.perf_counter() - t0
    print(f"data: {len(train_ds)} train / {len(val_ds)} val / {len(test_ds)} test windows "
          f"(acc {cfg.acc_hz:g} Hz, frames {cfg.frame_hz:g} Hz) in {t_data:.1f}s", flush=True)

    model = build_model(cfg, rc.fusion, mods, seed=rc.seed, **rc.model_options)
    pc = count_parameters(model)
    ts_bytes = state_nbytes(trainable_state(model))
    print(f"model: {rc.model_preset}/{rc.fusion} on {'+'.join(model.modalities)}: {pc['total']:,} params, "
          f"{pc['trainable']:,} trainable; trainable state {ts_bytes:,} bytes; device {device}", flush=True)
    cw = None if args.no_class_weights else class_weights_from_labels(train_ds.labels, model.num_classes)
    tc = dataclasses.replace(task.train_config(rc, epochs=args.epochs), monitor=args.monitor, label_smoothing=args.label_smoothing,
                             max_batches_per_epoch=args.max_batches,
                             swa_start=args.swa_start,
                             seed=rc.seed)
    if subject_batches:
        from torch.utils.data import DataLoader

        sampler = SubjectBatchSampler(train_ds.index["subject"].to_numpy(), tc.batch_size, rc.seed)
        train_loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=args.workers,
                                  persistent_workers=args.workers > 0)
    else:
        train_loader = _loader(train_ds, tc.batch_size, True, rc.seed, args.workers)

    def per_subject(subjects) -> dict:
        return {s: _loader(task.dataset(rc, [s], train=False), rc.eval_batch_size, False, 0, 0) for s in subjects}

    val_loaders, test_loaders = per_subject(split.val), per_subject(split.test)
    adapt = rc.eval_bn_stats == "subject"

    def validate(m):
        return evaluate_per_subject(m, val_loaders, device, adapt_bn=adapt, amp=tc.amp)

    t1 = time.perf_counter()
    history = fit(model, train_loader, tc, device=device, class_weights=cw, validate=validate,
                  log=lambda s: print(s, flush=True))
    t_train = time.perf_counter() - t1
    broken = [n for n, v in trainable_state(model).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # a diverged model is no result: say so instead of testing and saving it
        raise SystemExit(f"training diverged: {len(broken)} trainable arrays hold NaN or inf after training (e.g. "
                         f"{broken[0]}); lower lr (now {tc.lr:g}) or check the data. Nothing was saved.")
    val = validate(model)
    test = evaluate_per_subject(model, test_loaders, device, adapt_bn=adapt, amp=tc.amp)
    test_other = evaluate_per_subject(model, test_loaders, device, adapt_bn=not adapt, amp=tc.amp)
    print(f"test weighted F1 with {'global' if adapt else 'per-subject'} BatchNorm statistics instead: "
          f"{test_other['weighted_f1']:.4f}", flush=True)
    print(f"best epoch {history[-1].get('best_epoch', 'swa')}: val wF1 {val['weighted_f1']:.4f} | TEST acc {test['accuracy']:.4f} "
          f"wF1 {test['weighted_f1']:.4f} mF1 {test['macro_f1']:.4f} (n={test['n']})", flush=True)

    title = f"{rc.model_preset}/{rc.fusion} {'+'.join(model.modalities)} seed {rc.seed}"
    plot_learning_curves([h for h in history if isinstance(h["epoch"], int)], out / "learning_curves.png", title)
    plot_confusion_matrix(test["confusion_matrix"], out / "confusion_matrix.png", title=f"test: {title}")
    plot_pr_curves(test["labels"], test["probabilities"], out / "pr_curves.png", title=f"test: {title}")
    meta = task.checkpoint_meta(rc, run=run, best_epoch=history[-1].get("best_epoch"),
                                val_weighted_f1=val["weighted_f1"], test_weighted_f1=test["weighted_f1"])
    save_checkpoint(out / "best_model.safetensors", model, meta)

    timing = {"data": t_data, "train": t_train, "total": time.perf_counter() - t0}
    results = build_results(
        run, rc, history, test=test, test_other=test_other, subjects=split.test, epochs=tc.epochs,
        model=schema.model_entry(preset=rc.model_preset, fusion=rc.fusion, modalities=model.modalities,
                                 trainable_params=sum(v.numel() for v in trainable_state(model).values()),
                                 trainable_bytes=ts_bytes, config=cfg.to_dict(), params=pc),
        wall_time_s=timing["total"],
        command="python -m model.train " + " ".join(sys.argv[1:] if argv is None else argv), args=vars(args),
        subject_batches=subject_batches, train_config=tc.to_dict(), preprocess=asdict(pre), split=split.to_dict(),
        windows={"train": len(train_ds), "val": len(val_ds), "test": len(test_ds)},
        class_weights=None if cw is None else cw.tolist(), timing_s=timing,
        env={"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
             "python": platform.python_version(), "host_cpus": os.cpu_count()},
        artifacts=["results.json", "best_model.safetensors", "learning_curves.png", "confusion_matrix.png",
                   "pr_curves.png", *(["tensorboard"] if rc.tensorboard else [])])
    schema.write_results(out / "results.json", results)
    tracking.write_run(out, results, enabled=rc.tensorboard)  # from results.json's rows: the same figures
    print(f"wrote {out}/results.json", flush=True)
    return results


if __name__ == "__main__":
    main()

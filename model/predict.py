"""Classify new recordings with a trained model: per-window and per-recording exercise predictions.

    python -m model.predict --checkpoint outputs/<run>/best_model.safetensors <recordings> [--subject S] [--out DIR]

``<recordings>``: the MEx zip, an extracted MEx folder, or a folder holding new recordings in the MEx layout
(``act/SS/EE_act_R.csv``, ``acw/…``, ``dc_0.05_0.05/…``, ``pm_1.0_1.0/…``: subject SS, exercise EE, recording R;
exercise ``00`` = not known). A missing sensor (a whole modality folder, or one recording's file) is allowed: the
model gets zeros with that modality marked absent. A file with the wrong columns, or sampled far from the rate
MEx was recorded at (``data_partition.constants.RECORDED_HZ``, within a factor 2), is an error naming the file.

Nothing about the model is repeated on the command line: the architecture comes from the checkpoint's safetensors
header (federated runs and ``python -m model.train`` alike), the windows from the model's own input rates, and the
normalisation and BatchNorm handling from the run config stored with it (in the header; for a centralized
checkpoint without one, from the ``results.json`` beside it). ``normalization = "subject"`` z-scores each subject
by the statistics of its own new windows (no labels needed) and ``eval-bn-stats = "subject"`` re-estimates the
BatchNorm statistics on them (AdaBN), exactly as the evaluation of held-out subjects does; ``"global"``
normalisation needs the training subjects' statistics, which the header carries since
``fedtime.task.checkpoint_meta`` (older checkpoints are refused with the reason).

A recording's prediction is the class of highest **mean probability** over its windows. Writes into ``--out``
(default: ``<input>-predictions`` beside the input, or ``./predictions`` where that is not writable)
``windows.csv`` (one row per window), ``recordings.csv`` (one per recording) and ``predictions.json`` (both, with
the settings used); with labels (MEx file names carry the exercise) also the true class and the accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_partition import MExFormatError, NormStats, PreprocessConfig, WindowCache, parse_csv, scan_source
from data_partition.align import window_recording
from data_partition.constants import EXERCISE_NAMES, MODALITIES, RECORDED_HZ
from data_partition.reader import read_member

#: How a recording's windows make its prediction (printed and written with the results).
AGGREGATION = "mean probability over the recording's windows"


# ------------------------------------------------------------------------------------------- the checkpoint
def load_run(checkpoint: "str | Path"):
    """``(model, run config, header)`` of a checkpoint: the model rebuilt from its header with its weights, the
    run config from the header's meta (a centralized checkpoint without one: ``results.json`` beside it)."""
    from fedtime.config import ConfigError, RunConfig

    from .state import model_from_checkpoint, read_checkpoint_header

    path = Path(checkpoint)
    if not path.is_file():
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        header = read_checkpoint_header(path)
    except Exception as err:  # safetensors' own error types: not a checkpoint at all
        raise SystemExit(f"{path}: not a readable safetensors checkpoint ({err})") from None
    values, origin = header["meta"].get("run_config"), "its header"
    results = path.parent / "results.json"
    if values is None and results.is_file():  # model.train's checkpoint: the run config is in its results
        values, origin = json.loads(results.read_text()).get("config"), str(results)
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: no run config in its header nor a results.json beside it: the normalisation and "
                         "BatchNorm handling the model was trained with are unknown")
    known = RunConfig().to_run_config()  # keys of other versions and strategy tables are not needed here
    try:
        rc = RunConfig.from_run_config({k: v for k, v in values.items() if k in known})
        model = model_from_checkpoint(path)
    except (ConfigError, ValueError, KeyError) as err:
        raise SystemExit(f"{path}: {err} (run config from {origin})") from None
    return model, rc, header


def preprocess_config(header: dict) -> PreprocessConfig:
    """The windows the model was trained on: its config's input rates and window length (what
    ``fedtime.task.preprocess_config`` reads from the run's model preset)."""
    mc = header["model"]["config"]
    return PreprocessConfig(acc_hz=mc["acc_hz"], frame_hz=mc["frame_hz"], window_s=mc["window_s"])


def norm_stats(rc, header: dict, checkpoint: "str | Path") -> NormStats | None:
    """The training subjects' statistics when the run normalised with them (``normalization = "global"``)."""
    if rc.normalization != "global":
        return None
    stats = header["meta"].get("norm_stats")
    if stats is None:
        raise SystemExit(
            f"{checkpoint}: the model was trained with normalization = \"global\" (the training subjects' mean and "
            "std), and this checkpoint does not carry those statistics (written before checkpoints stored them, "
            "see fedtime.task.checkpoint_meta); new recordings cannot be normalised as in training. Retrain, or "
            "use a run with normalization = \"subject\" or \"per_window\"")
    return NormStats.from_dict(stats)


# ------------------------------------------------------------------------------------------- the recordings
@dataclass
class Recordings:
    """Windows of the input's recordings, in memory, in the order a window cache of them would hold
    (``WindowCache``: sorted by subject, exercise, recording), with each window's modality presence."""

    cache: WindowCache
    masks: np.ndarray  # bool [N, 4]: the modality was recorded
    files: dict  # (subject, exercise, recording) -> {modality: file}


def check_rate(t_us: np.ndarray, modality: str, name: str) -> None:
    """A file sampled far from the rate MEx recorded (median interval, factor 2 either way) is an error naming it."""
    t = np.unique(t_us)
    if len(t) < 2:
        return  # window_recording names it
    hz = 1e6 / float(np.median(np.diff(t)))
    want = RECORDED_HZ[modality]
    if not want / 2 <= hz <= want * 2:
        raise MExFormatError(f"{name}: sampled at {hz:.3g} Hz (median interval), but MEx's {modality} was recorded "
                             f"at {want:g} Hz and the model learned from such data; expected "
                             f"{want / 2:g}-{want * 2:g} Hz (resample it, or check the timestamps' unit)", file=name)


def read_recordings(source: "str | Path", pcfg: PreprocessConfig, subject: int | None = None, *,
                    modalities=MODALITIES, progress: bool = True) -> Recordings:
    """Parse and window every recording of ``source`` (of ``subject`` only, if given) as the window cache does
    (``parse_csv``, ``window_recording``), allowing absent modalities; ``modalities``: those the model uses
    (a recording must have one of them)."""
    from tqdm.auto import tqdm

    layout = scan_source(source, require_all=False)
    keys = [k for k in layout.recordings() if subject is None or k[0] == subject]
    if not keys:
        found = sorted({k[0] for k in layout.recordings()})
        raise MExFormatError(f"{layout.origin}: no recording" + (f" of subject {subject} (subjects: {found})"
                                                                   if subject is not None else " in the MEx layout"))
    index, arrays, masks, files = [], {m: [] for m in MODALITIES}, [], {}
    for key in tqdm(keys, desc="read recordings", unit="rec", disable=not progress):
        s, e, r = key
        members = layout.files[key]
        files[key] = {m: layout.display(f) for m, f in members.items()}
        name = f"subject {s:02d} exercise {e:02d} recording {r} ({next(iter(files[key].values()))} and siblings)"
        if not set(members) & set(modalities):
            raise MExFormatError(f"{name}: none of the model's modalities ({', '.join(modalities)}) was recorded")
        series = {}
        for m, member in members.items():
            t, x = parse_csv(read_member(layout, member), files[key][m], m)
            check_rate(t, m, files[key][m])
            series[m] = (t, x)
        rw = window_recording(series, pcfg, name=name)
        n = len(rw.starts)
        index.append(pd.DataFrame({"subject": s, "exercise": e, "recording": r, "start_s": rw.starts,
                                   "label": e - 1 if 1 <= e <= len(EXERCISE_NAMES) else -1}))
        for m in MODALITIES:
            arrays[m].append(rw.arrays[m])
        masks.append(np.tile([m in members for m in MODALITIES], (n, 1)))
    idx = pd.concat(index, ignore_index=True).astype({"start_s": np.float64, "subject": np.int64,
                                                      "exercise": np.int64, "recording": np.int64,
                                                      "label": np.int64})
    cache = WindowCache(path=Path(layout.origin), cfg=pcfg, key="in-memory", index=idx,
                        arrays={m: np.concatenate(a) for m, a in arrays.items()}, meta={})
    return Recordings(cache=cache, masks=np.concatenate(masks), files=files)


# ------------------------------------------------------------------------------------------- prediction
def predict_windows(model, recs: Recordings, rc, stats: NormStats | None, device, *, progress: bool = True
                    ) -> np.ndarray:
    """Class probabilities ``[N, C]`` of every window, subject by subject as the evaluation of held-out subjects
    computes them (``server_app.Evaluator`` / ``model.evaluate_per_subject``): the run's normalisation, windows in
    batches of its ``eval-batch-size``, BatchNorm statistics re-estimated on each subject's own windows when its
    ``eval-bn-stats`` is "subject"."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from data_partition import WindowDataset

    from .training import each_subject, predict

    adapt = rc.eval_bn_stats == "subject"
    loaders = {}
    for s in recs.cache.subjects:
        rows = recs.cache.subject_rows(s)
        ds = WindowDataset(recs.cache, [s], stats, normalization=rc.normalization, masks=recs.masks[rows],
                           in_memory=False)
        if adapt and len(ds) < 2:
            raise SystemExit(f"subject {s} has a single window: too few to re-estimate BatchNorm statistics on "
                             "(the run's eval-bn-stats is \"subject\"); give more of this subject's recordings")
        loaders[s] = DataLoader(ds, batch_size=rc.eval_batch_size)
    bar = tqdm(total=len(recs.cache), desc="predict", unit="win", disable=not progress)

    def counted(loader):
        for batch in loader:
            yield batch
            bar.update(int(batch["y"].shape[0]))

    probs = {}
    with bar:
        for s in each_subject(model, loaders, device, adapt_bn=adapt):
            logits, _, _ = predict(model, counted(loaders[s]), device, amp=rc.amp)
            probs[s] = torch.softmax(logits, -1).numpy()
    return np.concatenate([probs[s] for s in recs.cache.subjects])


def tables(recs: Recordings, probs: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per window, one per recording): subject, exercise, recording, [window start,] predicted class
    index and name, its probability, the class probabilities ``p_E1``…, and where the file names carry the
    exercise the true class and whether it was predicted."""
    idx = recs.cache.index
    names = list(EXERCISE_NAMES)[:probs.shape[1]]
    cols = [f"p_E{c + 1}" for c in range(probs.shape[1])]
    key = ["subject", "exercise", "recording"]

    def described(df: pd.DataFrame, p: np.ndarray) -> pd.DataFrame:
        pred = p.argmax(1)
        df = df.assign(predicted=pred, predicted_name=[names[c] for c in pred],
                       probability=p[np.arange(len(p)), pred])
        label = df.pop("label")
        if (label >= 0).any():
            known = label >= 0
            df["label"] = label.where(known).astype("Int64")
            df["label_name"] = [names[c] if c >= 0 else None for c in label]
            df["correct"] = (df["predicted"] == label).where(known).astype("boolean")
        return pd.concat([df.reset_index(drop=True), pd.DataFrame(p, columns=cols)], axis=1)

    windows = described(idx[[*key, "start_s", "label"]].rename(columns={"start_s": "window_start_s"})
                         .round({"window_start_s": 6}), probs)
    first = idx.groupby(key, sort=True).first().reset_index()
    groups = idx.groupby(key, sort=True).indices
    rows = [groups[k] for k in first[key].itertuples(index=False, name=None)]
    mean = np.stack([probs[g].mean(0) for g in rows])
    recordings = described(first[[*key, "label"]].assign(windows=[len(g) for g in rows]), mean)
    vote = [float((windows["predicted"].to_numpy()[g] == c).mean()) for g, c in zip(rows, mean.argmax(1))]
    recordings.insert(recordings.columns.get_loc("probability") + 1, "window_agreement", vote)
    present = [", ".join(m for m in MODALITIES if m in recs.files[k])
               for k in first[key].itertuples(index=False, name=None)]
    recordings.insert(recordings.columns.get_loc("windows") + 1, "modalities", present)
    return windows, recordings


def accuracy(df: pd.DataFrame) -> dict | None:
    if "correct" not in df:
        return None
    known = df["correct"].dropna()
    return {"accuracy": float(known.astype(bool).mean()), "n": int(len(known))}


def _jsonable(df: pd.DataFrame) -> list[dict]:
    def clean(v):
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return None
        return v.item() if isinstance(v, np.generic) else v

    return [{k: clean(v) for k, v in row.items()} for row in df.astype(object).to_dict("records")]


def default_out(source: Path) -> Path:
    """``<input>-predictions`` beside the input, or ``./predictions`` where that folder is not writable."""
    source = Path(source).resolve()
    beside = source.parent / f"{source.stem if source.is_file() else source.name}-predictions"
    return beside if os.access(source.parent, os.W_OK) else Path("predictions")


# ------------------------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m model.predict", description=__doc__.splitlines()[0])
    ap.add_argument("recordings", help="MEx zip, MEx folder, or a folder of new recordings in the MEx layout")
    ap.add_argument("--checkpoint", required=True, help="best_model.safetensors of a federated or centralized run")
    ap.add_argument("--subject", type=int, default=None, help="only this subject's recordings")
    ap.add_argument("--out", default=None, help="output folder (default: <input>-predictions beside the input)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Predict, print one line per recording, write the files; returns what ``predictions.json`` holds."""
    args = parse_args(argv)
    source = Path(args.recordings).expanduser()
    if not source.exists():
        raise SystemExit(f"input not found: {source}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, rc, header = load_run(args.checkpoint)
    stats = norm_stats(rc, header, args.checkpoint)
    pcfg = preprocess_config(header)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        recs = read_recordings(source, pcfg, args.subject, modalities=model.modalities,
                               progress=not args.no_progress)
    except MExFormatError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"model: {model.cfg.name}/{model.fusion_name} on {'+'.join(model.modalities)} ({args.checkpoint}); "
          f"{len(recs.cache)} windows of {pcfg.window_s:g} s from {len(recs.files)} recordings of subject(s) "
          f"{', '.join(map(str, recs.cache.subjects))}; normalization {rc.normalization!r}, BatchNorm statistics "
          f"{rc.eval_bn_stats!r}{' (re-estimated on each subject)' if rc.eval_bn_stats == 'subject' else ''}",
          flush=True)
    probs = predict_windows(model, recs, rc, stats, device, progress=not args.no_progress)
    windows, recordings = tables(recs, probs)

    print(f"per recording ({AGGREGATION}):")
    shown = ["subject", "exercise", "recording", "windows", "predicted_name", "probability", "window_agreement"]
    shown += [c for c in ("label_name", "correct") if c in recordings]
    print(recordings[shown].astype(object).fillna("-").to_string(index=False,
                                                                 float_format=lambda v: f"{v:.3f}"))
    acc = {"windows": accuracy(windows), "recordings": accuracy(recordings)}
    if acc["windows"] is not None:
        print(f"accuracy: windows {acc['windows']['accuracy']:.4f} (n={acc['windows']['n']}), recordings "
              f"{acc['recordings']['accuracy']:.4f} (n={acc['recordings']['n']})")

    out = Path(args.out) if args.out else default_out(source)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "checkpoint": str(args.checkpoint), "input": str(source), "subject": args.subject,
        "model": {"preset": model.cfg.name, "fusion": model.fusion_name, "modalities": list(model.modalities)},
        "preprocess": pcfg.to_dict(), "normalization": rc.normalization, "bn_stats": rc.eval_bn_stats,
        "eval_batch_size": rc.eval_batch_size, "aggregation": AGGREGATION, "classes": list(EXERCISE_NAMES),
        "accuracy": acc if acc["windows"] is not None else None,
        "recordings": _jsonable(recordings), "windows": _jsonable(windows),
    }
    windows.to_csv(out / "windows.csv", index=False)
    recordings.to_csv(out / "recordings.csv", index=False)
    (out / "predictions.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}/windows.csv, recordings.csv, predictions.json", flush=True)
    return summary


if __name__ == "__main__":
    main()

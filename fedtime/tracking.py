"""TensorBoard event files of a run, for federated and centralized runs alike, written from the rows and blocks of
results.json (`fedtime.results`), so the event files and results.json cannot disagree.

They go to `<run directory>/tensorboard/` (beside results.json); `tensorboard --logdir outputs` shows every run.
Run-config key `tensorboard = false` writes nothing. A resumed federated run appends a new event file to the same
folder and writes only the rounds it trains. Imports no Flower; torch, tensorboard and matplotlib on first use.

Tags (stable: dashboards and scripts read them). Step = the round (federated) or epoch (centralized):

    train/loss  train/accuracy  train/lr          history keys train_loss, train_accuracy, lr (centralized)
    val/loss  val/accuracy  val/weighted_f1  val/macro_f1      history keys val_<metric>
    comm/bytes_up  comm/bytes_down                bytes sent by / to the round's clients (federated)
    time/round_s  time/epoch_s                    history keys wall_s (federated), epoch_time_s (centralized)
    aggregation/weight/subject_NN                 FedMobile: a subject's aggregation weight in the round
    aggregation/shapley/<modality>                FedMFS: mean Shapley value of the modality over the round's clients
    aggregation/uploaded/<modality>               FedMFS: clients that uploaded the modality's encoder
    aggregation/generator_quality/<modality>      FedMobile: the aggregated latent generator's quality
At the end (step = the last round / epoch):
    test/loss  test/accuracy  test/weighted_f1  test/macro_f1  the tested model (none when results' test is None)
    test/confusion_matrix                         image: the test confusion matrix (rows = true class)
    personalized/{global,personal}_{weighted,macro}_f1   personalized evaluation (personal-eval-fraction > 0)
    config                                        text: the run config as a table (step 0; a resumed run adds one)
    HParams tab                                   the run config as hyperparameters, with the test/personalized
                                                  scalars above as its metrics
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from data_partition.constants import MODALITIES

#: history-row key -> tag
ROW_TAGS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "lr": "train/lr",
            "val_loss": "val/loss", "val_accuracy": "val/accuracy", "val_weighted_f1": "val/weighted_f1",
            "val_macro_f1": "val/macro_f1", "bytes_up": "comm/bytes_up", "bytes_down": "comm/bytes_down",
            "wall_s": "time/round_s", "epoch_time_s": "time/epoch_s", "epsilon": "privacy/epsilon"}
TEST_METRICS = ("loss", "accuracy", "weighted_f1", "macro_f1")
FOLDER = "tensorboard"


def event_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FOLDER


class Tracker:
    """One run's TensorBoard writer; every method is a no-op when `enabled` is false (nothing is created)."""

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], *, enabled: bool = True,
                 step: int = 0) -> None:
        """`config`: the run config (hyphenated keys), written as a text table at `step` (a resumed run: its
        last committed round) and, at `finish`, as hyperparameters."""
        self.config = dict(config)
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(event_dir(run_dir)))
        table = "\n".join(f"| {k} | `{v!r}` |" for k, v in sorted(self.config.items()))
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, global_step=step)
        self.writer.flush()
        self.last_step = step

    def row(self, row: Mapping[str, Any]) -> None:
        """One history row (a committed round or an epoch): its metrics and the strategy's aggregation record."""
        if self.writer is None:
            return
        step = int(row["round"] if "round" in row else row["epoch"])
        for key, tag in ROW_TAGS.items():
            if isinstance(row.get(key), (int, float)):
                self.writer.add_scalar(tag, row[key], step)
        for tag, value in aggregation_scalars(row.get("aggregation") or {}, self._modalities()).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps every committed round
        self.last_step = step

    def finish(self, results: Mapping[str, Any]) -> None:
        """The end of the run: test figures and confusion matrix, personalized figures, hyperparameters."""
        if self.writer is None:
            return
        step, metrics = self.last_step, {}
        test = results.get("test")
        if test:
            metrics.update({f"test/{m}": float(test[m]) for m in TEST_METRICS})
            from model.plots import confusion_figure

            self.writer.add_figure("test/confusion_matrix", confusion_figure(test["confusion_matrix"]), step)
        for name in ("global", "personal"):
            figures = (results.get("personalized") or {}).get(name) or {}
            metrics.update({f"personalized/{name}_{m}": float(figures[m]) for m in ("weighted_f1", "macro_f1")
                            if m in figures})
        hparams = {k: v for k, v in self.config.items() if isinstance(v, (bool, int, float, str))}
        # run_name ".": the hparams session (and the metrics, as scalars) in this run's folder, not a sub-run
        self.writer.add_hparams(hparams, metrics, run_name=".", global_step=step)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _modalities(self) -> list[str]:
        mods = str(self.config.get("modalities", ",".join(MODALITIES))).split(",")
        return [m for m in MODALITIES if m in mods]  # the model's order (model.network)


def aggregation_scalars(agg: Mapping[str, Any], modalities: list[str]) -> dict[str, float]:
    """Tag -> value of what a strategy recorded for a round (`aggregation` of a history row); unknown records
    are left out (results.json keeps them)."""
    out: dict[str, float] = {}
    for subject, w in (agg.get("weights") or {}).items():
        out[f"aggregation/weight/subject_{int(subject):02d}"] = float(w)
    shapley = agg.get("shapley") or {}
    for m in sorted({m for values in shapley.values() for m in values}):
        values = [float(v[m]) for v in shapley.values() if m in v]
        out[f"aggregation/shapley/{m}"] = sum(values) / len(values)
    uploaded = agg.get("uploaded") or {}
    for m in sorted({m for mods in uploaded.values() for m in mods}):
        out[f"aggregation/uploaded/{m}"] = float(sum(m in mods for mods in uploaded.values()))
    quality = agg.get("generator_quality") or []
    names = modalities if len(modalities) == len(quality) else [str(i) for i in range(len(quality))]
    for m, q in zip(names, quality):
        out[f"aggregation/generator_quality/{m}"] = float(q)
    return out


def write_run(run_dir: str | Path, results: Mapping[str, Any], *, enabled: bool = True) -> None:
    """A finished run's event files from its results (the centralized trainer: every epoch after training)."""
    tracker = Tracker(run_dir, results["config"], enabled=enabled)
    for row in results["history"]:
        tracker.row(row)
    tracker.finish(results)

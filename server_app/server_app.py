"""The ServerApp: validate the run config, federate, keep the best round, test it once, write results."""

from __future__ import annotations

import time
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from torch.utils.data import DataLoader

from model import evaluate_per_subject, load_trainable_state, trainable_state
from model.state import checkpoint_header
from fedtime import task
from fedtime.config import RunConfig
from fedtime.results import METRICS, model_entry, test_entry
from server_app.plots import write_plots
from server_app.run_store import RunStore, numpy_to_arrays
from server_app.strategies import build_strategy, check_strategy_options

app = ServerApp()


def run_name(cfg: RunConfig) -> str:
    return cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.strategy}-{cfg.model_preset}"


class Evaluator:
    """Server-side evaluation of a global trainable state on held-out subjects (validation or test).

    `bn_stats="global"` normalises with the aggregated BatchNorm statistics; `"subject"` (AdaBN) first
    re-estimates them on each subject's own unlabeled windows, then pools the predictions."""

    def __init__(self, cfg: RunConfig, subjects, model_options: dict) -> None:
        self.cfg = cfg
        self.model = task.model_for(cfg, model_options)
        self.loaders = {s: DataLoader(task.dataset(cfg, [s], train=False), batch_size=cfg.eval_batch_size)
                        for s in subjects}
        self.device = task.device()

    def __call__(self, arrays: ArrayRecord, bn_stats: str | None = None) -> dict:
        load_trainable_state(self.model, arrays.to_torch_state_dict())
        return evaluate_per_subject(self.model, self.loaders, self.device,
                                    adapt_bn=(bn_stats or self.cfg.eval_bn_stats) == "subject", amp=self.cfg.amp)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, context)
    except Exception as err:
        # the reason in the run's own log (Flower's simulation reports only "Simulation raised an exception")
        log(ERROR, "the run failed: %s: %s", type(err).__name__, err)
        raise


def run(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    check_strategy_options(cfg)  # every key checked before any data is read
    task.set_threads(cfg)
    torch.manual_seed(cfg.seed)
    cache, split, _ = task.open_data(cfg)  # builds the window cache once, before any client needs it
    path = Path(cfg.resume) if cfg.resume else Path(cfg.output_dir) / run_name(cfg)
    store = RunStore(path.expanduser().resolve(), cfg.to_run_config(), resume=bool(cfg.resume),
                     keep_rounds=cfg.average_last_rounds, tensorboard=cfg.tensorboard)
    log(INFO, "run directory: %s", store.path)

    strategy = build_strategy(cfg, split=split, store=store)
    options = strategy.model_options()
    model = task.model_for(cfg, options)
    initial = ArrayRecord(trainable_state(model))
    validate = Evaluator(cfg, split.val, options)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        m = validate(arrays)
        return MetricRecord({f"val_{k}": float(m[k]) for k in METRICS})

    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_server_rounds,
                            timeout=cfg.round_timeout, train_config=ConfigRecord(strategy.client_config()),
                            evaluate_fn=evaluate_fn)

    best_round = (store.results["best"] or {}).get("round")
    best, final = result.arrays, {"model": "best_round", "round": best_round}
    if cfg.average_last_rounds:
        # one noisy validation round (three subjects) does not choose the model: the mean of the last rounds does
        rounds, mean = store.last_rounds_average(cfg.average_last_rounds)
        best = numpy_to_arrays(mean)
        val = validate(best)
        final = {"model": "average_last_rounds", "rounds": rounds,
                 **{f"val_{k}": float(val[k]) for k in METRICS}}
        log(INFO, "final model: mean of rounds %s | val wF1 %.4f mF1 %.4f", rounds, val["weighted_f1"],
            val["macro_f1"])
    test = entry = None
    if strategy.global_head:
        test_eval = Evaluator(cfg, split.test, options)
        test = test_eval(best)
        both = {mode: test if mode == cfg.eval_bn_stats else test_eval(best, bn_stats=mode)
                for mode in ("global", "subject")}
        entry = test_entry(test, bn_stats=cfg.eval_bn_stats, subjects=split.test, by_bn_stats=both)
    else:
        log(INFO, "no test on the test subjects: %s keeps each client's fusion and classifier on its node (the "
            "personalized evaluation is its result)", cfg.strategy)
    extra = {}
    if cfg.personal_eval_fraction > 0:
        extra["personalized"] = strategy.personalized_evaluation(grid, best, ConfigRecord(strategy.client_config()),
                                                                 cfg.round_timeout)
    # patience ran out, or the privacy budget (`privacy.stopped` says which round it would have exceeded)
    status = "early_stopped" if strategy.early_stopping.should_stop or strategy.stop_reason else "completed"
    path = store.finish(status=status, best_arrays=best, test=entry,
        extra={**extra, "final_model": final, "scenario": task.scenario(cfg).describe(),
               "model": model_entry(preset=cfg.model_preset, fusion=cfg.fusion, modalities=model.modalities,
                                    trainable_params=sum(v.numel() for v in trainable_state(model).values()),
                                    trainable_bytes=initial.count_bytes())},
        header=checkpoint_header(model, task.checkpoint_meta(cfg, best_round=best_round), trainable_only=True))
    write_plots(store.path, store.results, test)
    if test is None:
        log(INFO, "best round %s | results: %s", best_round, path)
        return
    log(INFO, "best round %s | test acc %.4f weighted F1 %.4f macro F1 %.4f (BatchNorm statistics: %s; "
        "global %.4f / per subject %.4f weighted F1) | results: %s", best_round,
        test["accuracy"], test["weighted_f1"], test["macro_f1"], cfg.eval_bn_stats,
        both["global"]["weighted_f1"], both["subject"]["weighted_f1"], path)

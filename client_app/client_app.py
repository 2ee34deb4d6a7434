"""The ClientApp: one SuperNode = one MEx training subject, trained with the model's shared loop."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader, Subset

from data_partition.constants import MODALITIES
from model import class_weights_from_labels, evaluate, fit, load_trainable_state, trainable_state
from fedtime import task
from fedtime.config import RunConfig

app = ClientApp()


def _setup(context: Context) -> tuple[RunConfig, int]:
    cfg = RunConfig.from_run_config(context.run_config)
    if context.node_config.get("data-path"):
        cfg = cfg.replace(data_path=str(context.node_config["data-path"]))
    task.set_threads(cfg)
    return cfg, task.subject_of_partition(cfg, context.node_config)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which subject this node holds (cheap: no data is loaded)."""
    _, subject = _setup(context)
    return Message(RecordDict({"metrics": MetricRecord({"subject": subject})}), reply_to=msg)


def train_subject(cfg: RunConfig, subject: int, state: dict, round_config: dict | None = None, log=print,
                  model: torch.nn.Module | None = None) -> tuple[dict, dict]:
    """One client's local training from the global trainable state; returns (new state, metrics).
    `round_config`: what the strategy sent for this round (Flower's train config: `server-round`, its client
    settings and model options). Seeded by (seed, round, subject) so a run — or its resumption — repeats the same
    local steps.

    With `local-val-fraction` (FedMobile-style strategies) a fixed, seeded share of the subject's windows is
    held out: the client reports the global model's and its trained model's loss there (its contribution) and
    the trained model's weighted F1 (its local validation performance). `model`: an instance to train in
    (default: the process-wide one)."""
    sent = dict(round_config or {})
    server_round = int(sent.get("server-round", 0))
    local_val_fraction = float(sent.get("local-val-fraction", 0.0))
    model = model if model is not None else task.model_for(cfg, task.options_from_message(sent))
    load_trainable_state(model, state)
    data = task.dataset(cfg, [subject], train=True)
    labels = data.labels
    train_data, val_loader, present = data, None, data.masks.sum(axis=0)
    if local_val_fraction > 0:
        order = np.random.default_rng([cfg.seed, subject]).permutation(len(data))
        k = max(1, int(round(local_val_fraction * len(data))))
        val_idx, train_idx = np.sort(order[:k]), np.sort(order[k:])
        train_data, labels = Subset(data, train_idx.tolist()), labels[train_idx]
        present = data.masks[train_idx].sum(axis=0)
        # the client's own windows as it has them (its missing sensors, its labels), without training noise
        val_data = Subset(task.dataset(cfg.replace(augment_sigma=0.0), [subject], train=True), val_idx.tolist())
        val_loader = DataLoader(val_data, batch_size=cfg.eval_batch_size)
    seed = cfg.seed * 100_003 + server_round * 101 + subject
    torch.manual_seed(seed)
    weights = class_weights_from_labels(labels, 7)
    metrics: dict = {}
    if val_loader is not None:
        before = evaluate(model, val_loader, task.device(), weights, amp=cfg.amp)
        metrics["local_val_loss_before"] = float(before["loss"])
    train_cfg = task.train_config(cfg, sent)
    loader = DataLoader(train_data, batch_size=train_cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    where = f"[subject {subject:02d} round {server_round} {task.device_name()}]"
    history = fit(model, loader, train_cfg, device=task.device(), class_weights=weights,
                  log=lambda line: log(f"{where} {line}"))
    last = history[-1]
    if val_loader is not None:
        m = evaluate(model, val_loader, task.device(), weights, amp=cfg.amp)
        metrics.update(local_val_loss_after=float(m["loss"]), local_val_weighted_f1=float(m["weighted_f1"]))
    metrics.update({"train_loss": float(last["train_loss"]), "train_accuracy": float(last["train_accuracy"]),
                    "num-examples": len(train_data), "subject": subject})
    # training windows that have each modality: modality-aware averaging weighs each encoder by them
    metrics.update({f"present-{m}": int(c) for m, c in zip(MODALITIES, present)})
    if "train_generator" in last:
        metrics["train_generator_loss"] = float(last["train_generator"])
    if "train_unimodal" in last:
        metrics["train_unimodal_loss"] = float(last["train_unimodal"])
    new_state = task.scenario(cfg).poison_update(subject, trainable_state(model), state)
    return new_state, metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, subject = _setup(context)
    state, metrics = train_subject(cfg, subject, msg.content["arrays"].to_torch_state_dict(),
                                   dict(msg.content["config"]), log=lambda line: print(line, flush=True))
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's own subject (federated evaluation; the paper's protocol
    validates on the server instead, so the default strategy does not call this)."""
    cfg, subject = _setup(context)
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    model = task.model_for(cfg, task.options_from_message(config))
    load_trainable_state(model, msg.content["arrays"].to_torch_state_dict())
    data = task.dataset(cfg, [subject], train=False)
    m = evaluate(model, DataLoader(data, batch_size=cfg.eval_batch_size), task.device(), amp=cfg.amp)
    metrics = MetricRecord({"eval_loss": float(m["loss"]), "eval_accuracy": float(m["accuracy"]),
                            "eval_weighted_f1": float(m["weighted_f1"]), "num-examples": len(data)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

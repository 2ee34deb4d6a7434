"""The ClientApp: one SuperNode = one MEx training subject, trained with the model's shared loop."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from model import class_weights_from_labels, evaluate, fit, load_trainable_state, trainable_state
from server_app import task
from server_app.config import RunConfig

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


def train_subject(cfg: RunConfig, subject: int, state: dict, server_round: int, proximal_mu: float = 0.0,
                  log=print) -> tuple[dict, dict]:
    """One client's local training from the global trainable state; returns (new state, metrics). Seeded by
    (seed, round, subject) so a run — or its resumption — repeats the same local steps."""
    model = task.model_for(cfg)
    load_trainable_state(model, state)
    data = task.dataset(cfg, [subject], train=True)
    seed = cfg.seed * 100_003 + server_round * 101 + subject
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    history = fit(model, loader, cfg.train_config(), device=task.device(),
                  class_weights=class_weights_from_labels(data.labels, 7), proximal_mu=proximal_mu,
                  log=lambda line: log(f"[subject {subject:02d} round {server_round}] {line}"))
    last = history[-1]
    metrics = {"train_loss": float(last["train_loss"]), "train_accuracy": float(last["train_accuracy"]),
               "num-examples": len(data), "subject": subject}
    return trainable_state(model), metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, subject = _setup(context)
    config = msg.content["config"]
    state, metrics = train_subject(cfg, subject, msg.content["arrays"].to_torch_state_dict(),
                                   int(config.get("server-round", 0)), float(config.get("proximal-mu", 0.0)),
                                   log=lambda line: print(line, flush=True))
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's own subject (federated evaluation; the paper's protocol
    validates on the server instead, so the default strategy does not call this)."""
    cfg, subject = _setup(context)
    model = task.model_for(cfg)
    load_trainable_state(model, msg.content["arrays"].to_torch_state_dict())
    data = task.dataset(cfg, [subject], train=False)
    m = evaluate(model, DataLoader(data, batch_size=cfg.eval_batch_size), task.device())
    metrics = MetricRecord({"eval_loss": float(m["loss"]), "eval_accuracy": float(m["accuracy"]),
                            "eval_weighted_f1": float(m["weighted_f1"]), "num-examples": len(data)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

"""The ClientApp: one SuperNode = one MEx training subject, trained with the model's shared loop."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from data_partition.constants import MODALITIES
from model import (adapt_batchnorm, class_weights_from_labels, evaluate, fit, load_trainable_state,
                   trainable_state)
from model.state import modality_encoder_keys
from client_app import fedepa, fedmfs
from client_app.local_data import LocalData, holdout_fraction, local_data
from fedtime import privacy, task
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


def _arrays(node_state: RecordDict | None, name: str) -> dict[str, torch.Tensor] | None:
    """A tensor dict kept in the node's persistent state (Flower's `context.state`), or None."""
    if node_state is None or name not in node_state.array_records:
        return None
    return dict(node_state.array_records[name].to_torch_state_dict())


def _keep(node_state: RecordDict | None, name: str, tensors: dict[str, torch.Tensor]) -> None:
    if node_state is not None:
        node_state[name] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def local_seed(cfg: RunConfig, server_round: int, subject: int) -> int:
    """The seed of a client's round (its local steps, FedEPA's slice): a run, or its resumption, repeats them."""
    return cfg.seed * 100_003 + server_round * 101 + subject


def personal_start(cfg: RunConfig, subject: int, model: torch.nn.Module, state: dict, sent: dict, local: LocalData,
                   node_state: RecordDict | None, server_round: int) -> tuple[dict, dict]:
    """The state a client starts from (and is evaluated with, for a personalized evaluation): the global one,
    or with FedMFS its own encoders of the modalities nobody uploaded last round (and its own fusion and
    classifier with a local head), or with FedEPA the
    adaptive local aggregation of the global model into its own (W learnt and kept). Returns (state, metrics)."""
    metrics: dict = {}
    own = _arrays(node_state, "fedmfs.local") if "upload-modalities" in sent else None
    if own is not None:
        # FedMFS: the global encoders of the modalities someone uploaded last round (`fedmfs-fresh`) replace the
        # client's own; of the others, and of a local head, the client keeps what it trained
        fresh = {m for m in str(sent.get("fedmfs-fresh", "")).split(",") if m}
        keep = [k for m, ks in modality_encoder_keys(list(state)).items() if m not in fresh for k in ks]
        if sent.get("fedmfs-head") == "local":
            keep += fedmfs.head_keys(state)
        state = {**state, **{k: own[k] for k in keep}}
    if "ala-layers" in sent:
        layers = [x for x in str(sent["ala-layers"]).split(",") if x]
        weights = _arrays(node_state, "fedepa.ala-weights")
        state, weights, losses = fedepa.adaptive_local_aggregation(
            model, state, _arrays(node_state, "fedepa.local"), weights, local.train, layers=layers,
            slice_fraction=float(sent.get("ala-slice", 0.8)), lr=float(sent.get("ala-lr", 1.0)),
            epochs=int(sent.get("ala-epochs", 1)) if weights else int(sent.get("ala-first-epochs", 5)),
            seed=local_seed(cfg, server_round, subject), device=task.device(),
            class_weights=class_weights_from_labels(local.labels, 7))
        if weights:
            _keep(node_state, "fedepa.ala-weights", weights)
            metrics.update(ala_weight_mean=float(torch.cat([w.flatten() for w in weights.values()]).mean()),
                           ala_loss=float(np.mean(losses)) if losses else float("nan"))
    return state, metrics


def train_subject(cfg: RunConfig, subject: int, state: dict, round_config: dict | None = None, log=print,
                  model: torch.nn.Module | None = None, node_state: RecordDict | None = None) -> tuple[dict, dict]:
    """One client's local training from the global trainable state; returns (the state it sends, metrics).
    `round_config`: what the strategy sent for this round (Flower's train config: `server-round`, its client
    settings and model options). Seeded by (seed, round, subject) so a run — or its resumption — repeats the same
    local steps. `node_state`: the node's persistent state (`context.state`) for strategies that keep something
    between rounds (FedMFS's local head and upload recency, FedEPA's own model and mixing weights).

    With a held-out share (`local-val-fraction` of FedMobile-style and FedMFS strategies, or the run's
    `personal-eval-fraction`) a fixed, seeded share of the subject's windows is never trained on: the client
    reports the global model's and its trained model's loss there and the trained model's F1 (FedMobile's
    contribution, FedMFS's personal validation); FedMFS also measures each modality's Shapley value there and
    uploads only its chosen encoders. `model`: an instance to train in (default: the process-wide one).
    Under user-level DP (`dp-clip` in the round's config) the update it sends is clipped, and noised when the
    server asks for the clients' share of the noise (`privatize`)."""
    sent = dict(round_config or {})
    server_round = int(sent.get("server-round", 0))
    model = model if model is not None else task.model_for(cfg, task.options_from_message(sent))
    local = local_data(cfg, subject, holdout_fraction(cfg, sent), keep_unlabelled="alignment-weight" in sent)
    start, metrics = personal_start(cfg, subject, model, state, sent, local, node_state, server_round)
    load_trainable_state(model, start)
    val_loader = (DataLoader(local.heldout, batch_size=cfg.eval_batch_size) if local.heldout is not None
                  else None)
    seed = local_seed(cfg, server_round, subject)
    torch.manual_seed(seed)
    weights = class_weights_from_labels(local.labels, 7)
    if val_loader is not None:
        before = evaluate(model, val_loader, task.device(), weights, amp=cfg.amp)
        metrics["local_val_loss_before"] = float(before["loss"])
    train_cfg = task.train_config(cfg, sent)
    loader = DataLoader(local.train, batch_size=train_cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    where = f"[subject {subject:02d} round {server_round} {task.device_name()}]"
    history = fit(model, loader, train_cfg, device=task.device(), class_weights=weights,
                  log=lambda line: log(f"{where} {line}"))
    last = history[-1]
    if val_loader is not None:
        m = evaluate(model, val_loader, task.device(), weights, amp=cfg.amp)
        metrics.update(local_val_loss_after=float(m["loss"]), local_val_weighted_f1=float(m["weighted_f1"]),
                       local_val_macro_f1=float(m["macro_f1"]), local_val_accuracy=float(m["accuracy"]),
                       local_val_windows=len(local.heldout))
    metrics.update({"train_loss": float(last["train_loss"]), "train_accuracy": float(last["train_accuracy"]),
                    "num-examples": len(local.train), "subject": subject})
    if local.num_unlabelled:
        metrics["unlabelled_windows"] = local.num_unlabelled
    # training windows that have each modality: modality-aware averaging weighs each encoder by them
    metrics.update({f"present-{m}": int(c) for m, c in zip(MODALITIES, local.present)})
    for term in ("generator", "unimodal", "align"):
        if f"train_{term}" in last:
            metrics[f"train_{term}_loss"] = float(last[f"train_{term}"])
    trained = trainable_state(model)
    if "ala-layers" in sent:
        _keep(node_state, "fedepa.local", trained)
    if "upload-modalities" in sent:
        trained = _fedmfs_upload(cfg, model, trained, sent, local, val_loader, node_state, server_round, metrics)
    new_state = task.scenario(cfg).poison_update(subject, trained, state)
    if "dp-clip" in sent:
        new_state = privatize(new_state, state, sent)
    return new_state, metrics


def privatize(new_state: dict, global_state: dict, sent: dict) -> dict[str, torch.Tensor]:
    """User-level differential privacy (docs/privacy.md): the update (what is sent minus the round's global state,
    BatchNorm statistics included) clipped to `dp-clip`, plus N(0, `dp-noise-std`²) per value when the noise is
    the clients' (`dp-noise = "client"`). Applied last, to whatever the client would send (an attacker's scaled
    update too), as Flower's `fixedclipping_mod` wraps a whole ClientApp."""
    def arrays(state: dict) -> dict[str, np.ndarray]:
        return {k: torch.as_tensor(v).detach().cpu().numpy() for k, v in state.items()}

    out = privacy.privatize(arrays(new_state), arrays(global_state), float(sent["dp-clip"]),
                            float(sent.get("dp-noise-std", 0.0)))
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def _fedmfs_upload(cfg: RunConfig, model: torch.nn.Module, trained: dict, sent: dict, local: LocalData,
                   val_loader: DataLoader | None, node_state: RecordDict | None, server_round: int,
                   metrics: dict) -> dict:
    """FedMFS: Shapley value of each modality on the held-out windows, priority, the top-γ encoders (of the
    modalities this client has) plus, with a shared head, the fusion and classifier; a local head is kept."""
    if val_loader is None:
        raise ValueError("FedMFS needs held-out windows for its Shapley values: local-val-fraction is 0")
    shapley = fedmfs.modality_shapley(model, val_loader, task.device(), str(sent.get("shapley-value", "weighted_f1")))
    last = {} if node_state is None or "fedmfs.last-upload" not in node_state.config_records else \
        dict(node_state.config_records["fedmfs.last-upload"])
    prio = fedmfs.priorities(shapley, fedmfs.encoder_sizes(trained), fedmfs.recency(last, list(shapley), server_round),
                             (float(sent["shapley-weight"]), float(sent["size-weight"]), float(sent["recency-weight"])))
    have = [m for m, c in zip(MODALITIES, local.present) if c > 0]
    chosen = fedmfs.select(prio, int(sent["upload-modalities"]), have)
    shared = sent.get("fedmfs-head", "shared") == "shared"
    _keep(node_state, "fedmfs.local", trained)
    if node_state is not None:
        node_state["fedmfs.last-upload"] = ConfigRecord({**last, **{m: server_round for m in chosen}})
    metrics.update({f"shapley-{m}": v for m, v in shapley.items()})
    metrics.update({f"priority-{m}": v for m, v in prio.items()})
    metrics.update({f"uploaded-{m}": int(m in chosen) for m in shapley})
    return fedmfs.upload(trained, chosen, with_head=shared)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, subject = _setup(context)
    state, metrics = train_subject(cfg, subject, msg.content["arrays"].to_torch_state_dict(),
                                   dict(msg.content["config"]), log=lambda line: print(line, flush=True),
                                   node_state=context.state)
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


def personal_evaluate(cfg: RunConfig, subject: int, state: dict, sent: dict, node_state: RecordDict | None = None,
                      log=print) -> tuple[dict[str, np.ndarray], dict]:
    """Personalized evaluation on the subject's held-out windows (`personal-eval-fraction`, never trained on).
    `personal-eval` = "finetune": the global model, then the global model fine-tuned for one local epoch on the
    client's (labelled) training windows — the standard baseline; "own": the client's own model (FedMFS's
    local head over the global encoders, FedEPA's adaptive local aggregation). BatchNorm statistics are the
    client's own (re-estimated on its training windows) when `eval-bn-stats = "subject"`.
    Returns (arrays: labels and the class probabilities of each evaluated model, metrics)."""
    if not cfg.personal_eval_fraction > 0:
        raise ValueError("a personalized evaluation needs run-config 'personal-eval-fraction' > 0")
    mode = str(sent["personal-eval"])
    if mode not in ("finetune", "own"):
        raise ValueError(f"personal-eval must be 'finetune' or 'own', got {mode!r}")
    model = task.model_for(cfg, task.options_from_message(sent))
    local = local_data(cfg, subject, cfg.personal_eval_fraction, keep_unlabelled="alignment-weight" in sent)
    held = DataLoader(local.heldout, batch_size=cfg.eval_batch_size)
    adapt = DataLoader(local_data(cfg.replace(augment_sigma=0.0), subject, cfg.personal_eval_fraction,
                                  keep_unlabelled=True).train, batch_size=cfg.eval_batch_size)

    def score(name: str) -> dict:
        if cfg.eval_bn_stats == "subject":
            adapt_batchnorm(model, adapt, task.device())
        m = evaluate(model, held, task.device(), amp=cfg.amp)
        arrays[f"probs-{name}"] = m["probabilities"].astype(np.float32)
        arrays.setdefault("labels", m["labels"].astype(np.int64))
        return {f"{name}_weighted_f1": float(m["weighted_f1"]), f"{name}_macro_f1": float(m["macro_f1"])}

    arrays: dict[str, np.ndarray] = {}
    metrics: dict = {"subject": subject, "num-examples": len(local.heldout)}
    if mode == "finetune":
        load_trainable_state(model, state)
        metrics.update(score("global"))
        seed = cfg.seed * 100_003 + 999_983 + subject
        torch.manual_seed(seed)
        train_cfg = task.train_config(cfg, sent, epochs=1)
        loader = DataLoader(local.train, batch_size=train_cfg.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        fit(model, loader, train_cfg, device=task.device(), class_weights=class_weights_from_labels(local.labels, 7),
            log=lambda line: log(f"[subject {subject:02d} personal fine-tuning] {line}"))
        metrics.update(score("personal"))
    else:
        own = _arrays(node_state, "fedmfs.local")
        trained = own is not None or _arrays(node_state, "fedepa.local") is not None
        if own is not None:  # FedMFS: the model the client last trained (its encoders, its fusion and classifier)
            start = own
        else:
            start, _ = personal_start(cfg, subject, model, state, sent, local, node_state if trained else None,
                                      int(sent.get("server-round", 0)))
        load_trainable_state(model, start)
        metrics["never_trained"] = int(not trained)  # never sampled: its "own" model is the global one
        metrics.update(score("personal"))
    return arrays, metrics


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """A personalized evaluation when the message's config has `personal-eval` (`personal_evaluate`); else the
    global model on this node's own subject (federated evaluation; the paper's protocol validates on the server
    instead, so the default strategy does not ask for it)."""
    cfg, subject = _setup(context)
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    state = msg.content["arrays"].to_torch_state_dict()
    if "personal-eval" in config:
        arrays, metrics = personal_evaluate(cfg, subject, state, config, context.state,
                                            log=lambda line: print(line, flush=True))
        return Message(RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)
    model = task.model_for(cfg, task.options_from_message(config))
    load_trainable_state(model, state)
    data = task.dataset(cfg, [subject], train=False)
    m = evaluate(model, DataLoader(data, batch_size=cfg.eval_batch_size), task.device(), amp=cfg.amp)
    metrics = MetricRecord({"eval_loss": float(m["loss"]), "eval_accuracy": float(m["accuracy"]),
                            "eval_weighted_f1": float(m["weighted_f1"]), "num-examples": len(data)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

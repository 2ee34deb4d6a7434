"""The ClientApp's own logic, through its real code path on a small synthetic MEx archive (all 30 subjects, a few
windows each, tiny preset): the round's settings reach local training (FedProx's mu, FedMobile's hold-out and
model options), class weights come from the subject's own labels, local steps are seeded by (seed, round,
subject), and the Flower message handler answers with the trained state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client_app import client_app
from client_testutils import start_state
from fedtime import task
from fedtime.config import RunConfig
from model import trainable_state

SUBJECT = 2  # a training subject of split-seed 42


def _distance(cfg: RunConfig, a: dict, b: dict) -> float:
    """Squared distance over the trained parameters (what FedProx's term pulls; BatchNorm buffers are not)."""
    params = {n for n, p in task.model_for(cfg).named_parameters() if p.requires_grad}
    return sum(float((a[k].double() - torch.as_tensor(b[k]).double()).pow(2).sum()) for k in a if k in params)


def test_the_round_s_proximal_mu_reaches_local_training(cfg):
    """A large FedProx mu keeps the client near the global model; without the wiring both runs are equal."""
    start = start_state(cfg)
    free, _ = client_app.train_subject(cfg, SUBJECT, start, {"server-round": 1}, log=lambda s: None)
    held, _ = client_app.train_subject(cfg, SUBJECT, start, {"server-round": 1, "proximal-mu": 50.0},
                                       log=lambda s: None)
    assert _distance(cfg, held, start) < 0.5 * _distance(cfg, free, start)


def test_local_steps_are_seeded_by_seed_round_and_subject(cfg):
    start = start_state(cfg)
    a, ma = client_app.train_subject(cfg, SUBJECT, start, {"server-round": 3}, log=lambda s: None)
    b, _ = client_app.train_subject(cfg, SUBJECT, start, {"server-round": 3}, log=lambda s: None)
    c, _ = client_app.train_subject(cfg, SUBJECT, start, {"server-round": 4}, log=lambda s: None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    data = task.dataset(cfg, [SUBJECT], train=True)
    assert ma["subject"] == SUBJECT and ma["num-examples"] == len(data)
    assert ma["present-dc"] == len(data)  # every window has every sensor here


def test_class_weights_are_the_subject_s_own_balanced_weights(cfg, monkeypatch):
    seen = {}
    real_fit = client_app.fit

    def spy(model, loader, train_cfg, **kw):
        seen.update(kw, train_cfg=train_cfg)
        return real_fit(model, loader, train_cfg, **kw)

    monkeypatch.setattr(client_app, "fit", spy)
    client_app.train_subject(cfg, SUBJECT, start_state(cfg), {"server-round": 1}, log=lambda s: None)
    labels = task.dataset(cfg, [SUBJECT], train=True).labels
    counts = np.bincount(labels, minlength=7)
    expected = np.where(counts > 0, len(labels) / ((counts > 0).sum() * np.maximum(counts, 1)), 0.0)
    np.testing.assert_allclose(seen["class_weights"].numpy(), expected, rtol=1e-6)
    assert seen["train_cfg"].lr == 3e-3 and seen["train_cfg"].epochs == 1


def test_fedmobile_s_settings_hold_out_windows_and_add_its_generators(cfg):
    """What FedMobile sends (`local-val-fraction`, its model options) decides the hold-out and the model."""
    options = {"latent_generators": True, "generator_objective": "embedding"}
    start = start_state(cfg, options)
    sent = {"server-round": 1, "local-val-fraction": 0.25, **task.options_to_message(options)}
    state, metrics = client_app.train_subject(cfg, SUBJECT, start, sent, log=lambda s: None)
    n = len(task.dataset(cfg, [SUBJECT], train=True))
    assert metrics["num-examples"] == n - round(0.25 * n)
    assert {"local_val_loss_before", "local_val_loss_after", "local_val_weighted_f1"} <= set(metrics)
    assert any(k.startswith("generators.") for k in state) and "train_generator_loss" in metrics
    assert any(not torch.equal(state[k], start[k]) for k in state if k.startswith("generators.")
               and state[k].is_floating_point())


def test_the_train_message_handler_answers_with_the_trained_state(cfg):
    """The Flower entry point: run config from the Context, partition -> subject, arrays and config from the
    message, the trained state and metrics in the reply."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    start = start_state(cfg)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config=cfg.to_run_config())
    msg = Message(RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 2})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    reply = client_app.train(msg, context)
    from data_partition import paper_split

    subject = paper_split(42).train[0]  # partition i = the i-th training subject of the split
    assert reply.content["metrics"]["subject"] == subject
    direct, _ = client_app.train_subject(cfg, subject, start, {"server-round": 2}, log=lambda s: None)
    got = reply.content["arrays"].to_torch_state_dict()
    assert sorted(got) == sorted(direct) and all(torch.equal(got[k], direct[k]) for k in got)

"""FedMFS's and FedEPA's client side and the label-scarce scenario, through their real code on a small synthetic
MEx archive (tiny preset): exact modality Shapley values, what a FedMFS reply carries and what it weighs, FedALA's
mixing weights kept in the node's state, the alignment loss, the labelled share, the personalized evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client_app import client_app, fedepa, fedmfs
from client_app.local_data import local_data
from client_testutils import start_state
from fedtime import task
from fedtime.config import RunConfig
from fedtime.scenario import Scenario
from fedtime.shapley import shapley_values
from model import trainable_state
from model.alignment import ModalityAlignment
from model.state import modality_encoder_keys

SUBJECT = 2  # a training subject of split-seed 42
QUIET = dict(log=lambda s: None)


def _context(cfg: RunConfig):
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return Context(run_id=1, node_id=7, node_config={"subject": SUBJECT}, state=RecordDict(),
                   run_config=cfg.to_run_config())


def _train_message(state: dict, config: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    return Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)}), dst_node_id=7,
                   message_type=MessageType.TRAIN)


# ------------------------------------------------------------------------------------------- Shapley values
def test_shapley_values_are_exact_on_a_toy_game():
    """A weighted voting game [q=3; 2, 1, 1]: player 0 is pivotal in 4 of 6 orders, players 1 and 2 in 1 each."""
    weights = [2, 1, 1]
    phi = shapley_values(3, lambda s: float(sum(weights[i] for i in s) >= 3))
    np.testing.assert_allclose(phi, [4 / 6, 1 / 6, 1 / 6])
    # efficiency: the values share v(N) - v(∅)
    phi = shapley_values(4, lambda s: len(s) ** 2)
    assert phi.sum() == pytest.approx(16) and np.allclose(phi, 4)


class MaskedToy(nn.Module):
    """Predicts window i's class right when its `key` sensor is in the mask, else a wrong class: a window keyed
    to act is classified by act alone, so v(S) = share of windows whose key sensor is in S (accuracy)."""

    modalities = ("act", "acw", "dc", "pm")

    def forward(self, batch):
        right = batch["mask"][torch.arange(len(batch["y"])), batch["key"]]
        pred = torch.where(right, batch["y"], (batch["y"] + 1) % 7)
        return nn.functional.one_hot(pred, 7).float(), torch.zeros(())


def test_modality_shapley_is_exact_on_a_masked_toy_model():
    y = torch.arange(8) % 7
    key = torch.tensor([0, 0, 0, 0, 2, 2, 3, 3])  # half keyed to act, a quarter each to dc and pm
    batch = {"y": y, "key": key, "mask": torch.ones(8, 4, dtype=torch.bool)}
    phi = fedmfs.modality_shapley(MaskedToy(), [batch], torch.device("cpu"), value="accuracy")
    assert phi == pytest.approx({"act": 0.5, "acw": 0.0, "dc": 0.25, "pm": 0.25})
    # a window that lacks its key sensor is never right, whatever the coalition
    batch["mask"][4:6, 2] = False
    phi = fedmfs.modality_shapley(MaskedToy(), [batch], torch.device("cpu"), value="accuracy")
    assert phi == pytest.approx({"act": 0.5, "acw": 0.0, "dc": 0.0, "pm": 0.25})


def test_priority_prefers_valuable_then_small_encoders_and_select_takes_the_top_gamma():
    shapley = {"act": 0.1, "acw": 0.3, "dc": 0.5, "pm": 0.1}
    sizes = {"act": 100, "acw": 100, "dc": 400, "pm": 400}
    p = fedmfs.priorities(shapley, sizes, {}, (1.0, 0.0, 0.0))
    assert fedmfs.select(p, 2, shapley) == ["acw", "dc"]
    p = fedmfs.priorities(shapley, sizes, {}, (1.0, 1.0, 0.0))  # dc: 1 + 0; acw: 0.5 + 0.75; act: 0 + 0.75
    assert p == pytest.approx({"act": 0.75, "acw": 1.25, "dc": 1.0, "pm": 0.0})
    assert fedmfs.select(p, 1, shapley) == ["acw"]
    assert fedmfs.select(p, 2, ["act", "pm"]) == ["act", "pm"]  # only what the client has
    # recency: a modality not sent for long gains
    p = fedmfs.priorities(shapley, sizes, {"act": 4.0, "acw": 1.0, "dc": 1.0, "pm": 1.0}, (0.0, 0.0, 1.0))
    assert fedmfs.select(p, 1, shapley) == ["act"]


# ------------------------------------------------------------------------------------------- FedMFS reply
def test_a_fedmfs_reply_carries_only_the_chosen_encoders_and_its_bytes_are_the_payload(cfg):
    context = _context(cfg)
    sent = {"server-round": 1, "upload-modalities": 1, "shapley-weight": 1.0, "size-weight": 1.0,
            "recency-weight": 0.0, "fedmfs-head": "local", "local-val-fraction": 0.25}
    start = start_state(cfg)
    reply = client_app.train(_train_message(start, sent), context)
    rec = reply.content["arrays"]
    got = rec.to_torch_state_dict()
    groups = modality_encoder_keys(list(start))
    metrics = reply.content["metrics"]
    chosen = [m for m in groups if metrics[f"uploaded-{m}"]]
    assert len(chosen) == 1 and sorted(got) == sorted(groups[chosen[0]])  # one encoder, no head
    assert {f"shapley-{m}" for m in groups} <= set(metrics)
    # what the server counts (Flower's count_bytes) is what was serialized: each array's serialized bytes and its
    # name; the record's wire message (protobuf) adds only a few framing bytes per array
    from flwr.common.serde import array_record_to_proto

    assert rec.count_bytes() == sum(len(a.data) + len(k) for k, a in rec.items())
    wire = array_record_to_proto(rec).ByteSize()
    assert rec.count_bytes() <= wire <= rec.count_bytes() + 64 * len(rec)
    assert rec.count_bytes() < 0.5 * sum(v.numel() * v.element_size() for v in start.values())
    # the client keeps what it trained; the next round takes the global encoders only of the modalities someone
    # uploaded (`fedmfs-fresh`), and with a local head keeps its own fusion and classifier
    own = context.state.array_records["fedmfs.local"].to_torch_state_dict()
    assert sorted(own) == sorted(start)
    assert dict(context.state.config_records["fedmfs.last-upload"]) == {chosen[0]: 1}
    fresh = "acw" if chosen[0] != "acw" else "act"
    glob = {k: v + 1.0 if v.is_floating_point() else v for k, v in start.items()}
    nxt, _ = client_app.personal_start(cfg, SUBJECT, task.model_for(cfg), glob, {**sent, "fedmfs-fresh": fresh},
                                       local_data(cfg, SUBJECT, 0.25), context.state, 2)
    for m, ks in groups.items():
        assert all(torch.equal(nxt[k], (glob if m == fresh else own)[k]) for k in ks)
    assert all(torch.equal(nxt[k], own[k]) for k in fedmfs.head_keys(start))
    # shared head: the fusion and classifier travel too
    state, _ = client_app.train_subject(cfg, SUBJECT, start, {**sent, "upload-modalities": 2,
                                                              "fedmfs-head": "shared"}, **QUIET)
    assert set(fedmfs.head_keys(start)) <= set(state)
    assert len([m for m, ks in groups.items() if ks[0] in state]) == 2


# ------------------------------------------------------------------------------------------- FedEPA
EPA = {"alignment-weight": 1.0, "ala-layers": "fusion,classifier", "ala-slice": 0.8, "ala-lr": 1.0,
       "ala-first-epochs": 3, "ala-epochs": 1}


def test_fedala_weights_stay_in_0_1_and_persist_across_rounds_of_one_node(cfg):
    options = {"modality_alignment": True}
    context = _context(cfg)
    sent = {**EPA, **task.options_to_message(options)}
    start = start_state(cfg, options)
    client_app.train(_train_message(start, {**sent, "server-round": 1}), context)
    assert "fedepa.local" in context.state.array_records  # round 1: nothing to mix yet, the own model kept
    assert "fedepa.ala-weights" not in context.state.array_records
    # round 2 from a different global model: W is learnt and kept
    moved = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in start.items()}
    reply = client_app.train(_train_message(moved, {**sent, "server-round": 2}), context)
    w2 = context.state.array_records["fedepa.ala-weights"].to_torch_state_dict()
    model = task.model_for(cfg, options)
    assert sorted(w2) == sorted(fedepa.layer_keys(model, ["fusion", "classifier"]))
    flat = torch.cat([w.flatten() for w in w2.values()])
    assert flat.min() >= 0 and flat.max() <= 1 and (flat < 1).any()  # learnt, and clipped to [0, 1]
    assert 0 <= reply.content["metrics"]["ala_weight_mean"] <= 1
    # round 3 starts from the kept W: with a step size of ~0 it comes back unchanged
    client_app.train(_train_message(moved, {**sent, "server-round": 3, "ala-lr": 1e-12}), context)
    w3 = context.state.array_records["fedepa.ala-weights"].to_torch_state_dict()
    assert all(torch.allclose(w3[k], w2[k], atol=1e-6) for k in w2)


def test_adaptive_local_aggregation_mixes_only_the_top_layers(cfg):
    options = {"modality_alignment": True}
    model = task.model_for(cfg, options)
    g = start_state(cfg, options)
    loc = {k: v + 1.0 if v.is_floating_point() else v for k, v in g.items()}
    data = local_data(cfg, SUBJECT, 0.0).train
    mixed, w, losses = fedepa.adaptive_local_aggregation(model, g, loc, None, data, layers=["classifier"],
                                                         slice_fraction=0.5, lr=1.0, epochs=2, seed=0,
                                                         device=torch.device("cpu"))
    top = set(fedepa.layer_keys(model, ["classifier"]))
    assert top and set(w) == top and losses
    for k in g:
        if k in top:
            expect = loc[k] + (g[k] - loc[k]) * w[k]
            assert torch.allclose(mixed[k], expect)
        else:
            assert torch.equal(mixed[k], g[k])  # lower layers (and BatchNorm statistics): the global ones


def test_the_alignment_loss_falls_on_a_toy_batch():
    torch.manual_seed(0)
    b, m, d = 32, 4, 16
    shared = torch.randn(b, 1, d)
    e = shared + 0.3 * torch.randn(b, m, d)  # four views of the same windows
    present = torch.ones(b, m, dtype=torch.bool)
    present[:8, 2] = False
    align = ModalityAlignment(m, d)
    opt = torch.optim.Adam(align.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        a, c = align.parts(e)
        loss = align.alignment_loss(a, c, present)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]
    # a training forward leaves it for the training loop; the output keeps the shape and starts as the identity
    align.train()
    out = align(e, present)
    assert out.shape == e.shape and align.loss.requires_grad


def test_the_model_with_alignment_trains_its_alignment_on_unlabelled_windows(cfg):
    """Label-scarce FedEPA: the unlabelled windows stay in training (label -1), the loss terms name 'align'."""
    scarce = cfg.replace(labeled_fraction=0.2)
    options = {"modality_alignment": True}
    state, metrics = client_app.train_subject(scarce, SUBJECT, start_state(scarce, options),
                                              {"server-round": 1, "alignment-weight": 1.0,
                                               **task.options_to_message(options)}, **QUIET)
    n = len(task.dataset(scarce, [SUBJECT], train=True))
    assert metrics["num-examples"] == n and metrics["unlabelled_windows"] == n - round(0.2 * n)
    assert np.isfinite(metrics["train_align_loss"]) and metrics["train_align_loss"] > 0
    # any other strategy trains on the labelled windows only
    _, plain = client_app.train_subject(scarce, SUBJECT, start_state(scarce), {"server-round": 1}, **QUIET)
    assert plain["num-examples"] == round(0.2 * n)


# ------------------------------------------------------------------------------------------- label-scarce
def test_the_labelled_share_is_exact_and_seeded(cfg):
    sc = Scenario.from_config(cfg.replace(labeled_fraction=0.1), range(1, 31))
    for n in (7, 10, 123, 1000):
        keep = sc.labelled(SUBJECT, n)
        assert keep.sum() == max(1, round(0.1 * n))
        assert np.array_equal(keep, sc.labelled(SUBJECT, n))  # the same windows every round
    assert not np.array_equal(sc.labelled(2, 1000), sc.labelled(3, 1000))  # each subject its own
    other_seed = Scenario.from_config(cfg.replace(labeled_fraction=0.1, seed=1), range(1, 31))
    assert not np.array_equal(sc.labelled(2, 1000), other_seed.labelled(2, 1000))
    assert Scenario.from_config(cfg, range(1, 31)).labelled(2, 50).all()


def test_held_out_windows_are_never_trained_on_and_labels_apply_to_the_rest(cfg):
    scarce = cfg.replace(labeled_fraction=0.5, personal_eval_fraction=0.2)
    local = local_data(scarce, SUBJECT, 0.2)
    n = len(task.dataset(scarce, [SUBJECT], train=True))
    k = round(0.2 * n)
    assert len(local.heldout) == k and len(local.train) == round(0.5 * (n - k))
    held = set(local.heldout.indices)
    assert held.isdisjoint(local.train.indices)


# ------------------------------------------------------------------------------------------- personalized eval
def test_personalized_evaluation_fine_tunes_the_global_model_or_uses_the_node_s_own(cfg):
    pcfg = cfg.replace(personal_eval_fraction=0.25)
    start = start_state(pcfg)
    arrays, metrics = client_app.personal_evaluate(pcfg, SUBJECT, start, {"personal-eval": "finetune"}, **QUIET)
    n_held = len(local_data(pcfg, SUBJECT, 0.25).heldout)
    assert metrics["num-examples"] == n_held and arrays["labels"].shape == (n_held,)
    assert arrays["probs-global"].shape == arrays["probs-personal"].shape == (n_held, 7)
    assert not np.allclose(arrays["probs-global"], arrays["probs-personal"])  # the epoch changed the model
    # "own" on a node that never trained: its model is the global one, and it says so
    context = _context(pcfg)
    sent = {"personal-eval": "own", "fedmfs-head": "local"}
    arrays, metrics = client_app.personal_evaluate(pcfg, SUBJECT, start, sent, context.state, **QUIET)
    assert metrics["never_trained"] == 1 and "probs-global" not in arrays
    with pytest.raises(ValueError, match="personal-eval-fraction"):
        client_app.personal_evaluate(cfg, SUBJECT, start, {"personal-eval": "finetune"}, **QUIET)


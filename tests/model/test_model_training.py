import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from model import TrainConfig, build_model, class_weights_from_labels, evaluate, fit, proximal_term
from model.plots import plot_confusion_matrix, plot_learning_curves, plot_pr_curves
from model.training import jsonable_metrics, unimodal_loss
from model_testutils import make_batch, separable_batches


def test_fit_reduces_loss_and_logs(tiny):
    torch.manual_seed(0)
    model = build_model(tiny, "magnet", ("act", "dc"), num_classes=3, seed=0)
    data = separable_batches(tiny, 6)
    lines = []
    cfg = TrainConfig(lr=1e-2, epochs=10, grad_accum=2, seed=0)
    hist = fit(model, data, cfg, device="cpu", log=lines.append)
    assert len(hist) == 10 and len(lines) == 10 and "epoch 1/10" in lines[0]
    assert hist[-1]["train_ce"] < 0.5 * hist[0]["train_ce"]
    assert hist[-1]["train_accuracy"] > 0.9
    assert hist[0]["optimizer_steps"] == 3


def test_partial_accumulation_is_stepped(tiny):
    model = build_model(tiny, "concat", ("act",), seed=0)
    data = separable_batches(tiny, 7)
    hist = fit(model, data, TrainConfig(epochs=1, grad_accum=6), device="cpu", log=None)
    assert hist[0]["optimizer_steps"] == 2  # 6 + a leftover of 1, not dropped
    assert hist[0]["train_samples"] == 56


def test_frozen_base_unchanged_by_fit(tiny):
    model = build_model(tiny, "magnet", seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    fit(model, separable_batches(tiny, 3), TrainConfig(lr=1e-2, epochs=1, grad_accum=1), device="cpu", log=None)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_early_stopping_restores_best(tiny):
    """The best epoch is not the last: validation labels are shifted by one class, so the better the model learns
    the training task, the worse its validation loss. fit must stop after ``patience`` bad epochs and hand back the
    best epoch's weights and BatchNorm statistics, not the last epoch's."""
    from model.state import trainable_state

    torch.manual_seed(0)
    model = build_model(tiny, "magnet", ("act", "acw"), num_classes=3, seed=0)
    train = separable_batches(tiny, 4, seed=3)
    val = [dict(b, y=(b["y"] + 1) % 3) for b in separable_batches(tiny, 2, seed=2)]
    snapshots = []  # the trainable state at the end of each epoch, as validation sees it

    def validate(m):
        snapshots.append(trainable_state(m))
        return evaluate(m, val, "cpu")

    cfg = TrainConfig(lr=1e-2, epochs=6, grad_accum=2, patience=2, monitor="loss", seed=0)
    hist = fit(model, train, cfg, device="cpu", validate=validate, log=None)
    best = min(hist, key=lambda h: h["val_loss"])
    assert best["epoch"] < hist[-1]["epoch"] == len(snapshots) < cfg.epochs  # stopped early, after the best
    assert hist[-1]["epoch"] - best["epoch"] == cfg.patience
    assert hist[-1]["best_epoch"] == best["epoch"]
    final = trainable_state(model)
    assert all(torch.equal(final[k], snapshots[best["epoch"] - 1][k]) for k in final)
    assert any(not torch.equal(final[k], snapshots[-1][k]) for k in final)
    assert evaluate(model, val, "cpu")["loss"] == best["val_loss"]
    assert all("val_weighted_f1" in h and "lr" in h for h in hist)
    # val_loader: the same validation, run by fit itself
    again = build_model(tiny, "magnet", ("act", "acw"), num_classes=3, seed=0)
    hist2 = fit(again, train, cfg, device="cpu", val_loader=val, log=None)
    assert [h["val_loss"] for h in hist2] == [h["val_loss"] for h in hist]
    assert all(torch.equal(v, final[k]) for k, v in trainable_state(again).items())


def test_proximal_gradient_is_mu_times_difference():
    torch.manual_seed(0)
    w = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    anchor = [torch.randn(4, 3), torch.randn(5)]
    mu = 0.37
    term = proximal_term(w, anchor, mu)
    term.backward()
    for p, a in zip(w, anchor):
        assert torch.allclose(p.grad, mu * (p.detach() - a), atol=1e-6)
    assert torch.allclose(term, 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(w, anchor)))


def test_fedprox_anchor_in_fit(tiny):
    """With a huge mu the trainable weights stay at the anchor (the global model)."""
    model = build_model(tiny, "concat", ("act",), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit(model, separable_batches(tiny, 4), TrainConfig(lr=1e-3, epochs=1, grad_accum=1, proximal_mu=1e4),
        device="cpu", log=None)
    drift_prox = sum((p - before[n]).abs().sum() for n, p in model.named_parameters() if p.requires_grad)
    model2 = build_model(tiny, "concat", ("act",), seed=0)
    fit(model2, separable_batches(tiny, 4), TrainConfig(lr=1e-3, epochs=1, grad_accum=1), device="cpu", log=None)
    drift_free = sum((p - before[n]).abs().sum() for n, p in model2.named_parameters() if p.requires_grad)
    assert drift_prox < drift_free


def test_class_weights_from_labels():
    w = class_weights_from_labels([0, 0, 0, 1, 2, 2], 4)
    assert w.shape == (4,) and w[3] == 0
    assert torch.allclose(w[:3], torch.tensor([6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)]))
    assert torch.allclose(class_weights_from_labels(np.array([1, 1, 0, 0]), 2), torch.ones(2))


class FixedLogits(torch.nn.Module):
    def forward(self, batch):
        return batch["logits"], batch["logits"].new_zeros(())


def test_evaluate_matches_sklearn(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g)
    y = torch.randint(0, 7, (50,), generator=g)
    y[:20] = logits[:20].argmax(1)  # some right, some wrong
    loader = [{"logits": logits[i : i + 16], "y": y[i : i + 16]} for i in range(0, 50, 16)]
    m = evaluate(FixedLogits(), loader, "cpu")
    pred = logits.argmax(1).numpy()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted", labels=range(7), zero_division=0))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=range(7), zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(7)).tolist()
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert m["probabilities"].shape == (50, 7) and np.allclose(m["probabilities"].sum(1), 1, atol=1e-5)
    assert (m["labels"] == y.numpy()).all()
    assert str(3) in m["per_class"] and "weighted avg" in m["per_class"]
    w = torch.rand(7, generator=g) + 0.5
    mw = evaluate(FixedLogits(), loader, "cpu", class_weights=w)
    assert mw["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y, weight=w)), rel=1e-5)
    j = jsonable_metrics(m)
    assert "probabilities" not in j and isinstance(j["weighted_f1"], float)
    # plots
    hist = [{"epoch": e, "train_ce": 1 / e, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.6,
             "val_weighted_f1": 0.6, "best_epoch": 2} for e in (1, 2, 3)]
    for p in (plot_learning_curves(hist, tmp_path / "lc.png"),
              plot_confusion_matrix(m["confusion_matrix"], tmp_path / "cm.png"),
              plot_pr_curves(m["labels"], m["probabilities"], tmp_path / "pr.png")):
        assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"


def test_modality_dropout_keeps_one_and_only_drops():
    from model.training import drop_modalities

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(500, 4, generator=g) > 0.3
    mask[0] = False
    new = drop_modalities(mask, 0.6, generator=g)
    assert not (new & ~mask).any()  # never re-adds an absent modality
    assert (new.any(1) == mask.any(1)).all()  # every sample that had one keeps one
    assert 0.3 < 1 - new.sum() / mask.sum() < 0.6
    assert torch.equal(drop_modalities(mask, 0.0), mask)


def test_swa_averages_the_weights_of_the_last_epochs(tiny):
    from model import TrainConfig, build_model, fit

    torch.manual_seed(0)
    model = build_model(tiny, "concat", seed=0)
    batches = [make_batch(tiny, b=8, seed=i) for i in range(3)]
    snapshots = []

    def validate(m):
        snapshots.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return {"loss": 1.0, "accuracy": 0.5, "weighted_f1": 0.5, "macro_f1": 0.5}

    hist = fit(model, batches, TrainConfig(lr=1e-2, grad_accum=1, epochs=4, swa_start=2, patience=1), device="cpu",
               validate=validate, log=None)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, "swa"]  # no early stopping with SWA (patience 1 ignored)
    assert hist[-1]["swa_epochs"] == 3
    for n, p in model.named_parameters():
        if p.requires_grad:  # the final weights: the mean of epochs 2, 3 and 4
            torch.testing.assert_close(p.detach(), sum(s[n] for s in snapshots[1:4]) / 3, rtol=1e-5, atol=1e-6)


def test_a_client_without_a_modality_sends_its_encoder_back_unchanged(tiny):
    """The premise of modality-aware averaging: windows that all lack the depth camera leave its encoder (weights
    and BatchNorm statistics) exactly as received, while the other encoders and the shared parts train."""
    from model.state import modality_encoder_keys, trainable_state

    model = build_model(tiny, "magnet", seed=0)
    batches = separable_batches(tiny, 3)
    for b in batches:
        b["mask"][:, 2] = False  # MODALITIES order act, acw, dc, pm
    before = trainable_state(model)
    fit(model, batches, TrainConfig(lr=1e-2, epochs=1, grad_accum=1), device="cpu", log=None)
    after = trainable_state(model)
    groups = modality_encoder_keys(list(before))
    assert set(groups) == {"act", "acw", "dc", "pm"}
    assert all(torch.equal(before[k], after[k]) for k in groups["dc"])
    for m in ("act", "pm"):
        assert any(not torch.equal(before[k], after[k]) for k in groups[m]), m
    shared = [k for k in before if not k.startswith("encoders.")]
    assert any(not torch.equal(before[k], after[k]) for k in shared)


def test_unimodal_loss_averages_the_present_pairs_only():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [9.0, -9.0]]])  # [B=2, M=2, C=2]
    present = torch.tensor([[True, True], [True, False]])
    y = torch.tensor([0, 1])
    ce = lambda row, t: float(-torch.log_softmax(row, -1)[t])  # noqa: E731
    expected = (ce(logits[0, 0], 0) + ce(logits[0, 1], 0) + ce(logits[1, 0], 1)) / 3
    assert float(unimodal_loss(logits, present, y)) == pytest.approx(expected)
    w = torch.tensor([1.0, 3.0])  # class weights: the weighted mean of torch's cross-entropy
    expected_w = (ce(logits[0, 0], 0) + ce(logits[0, 1], 0) + 3 * ce(logits[1, 0], 1)) / 5
    assert float(unimodal_loss(logits, present, y, w)) == pytest.approx(expected_w)
    none = unimodal_loss(logits.requires_grad_(), torch.zeros_like(present), y)
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_unimodal_heads_teach_each_encoder_to_classify_alone(tiny):
    """The class is in act only; after training with the unimodal loss, act's own head gets it right."""
    model = build_model(tiny, "magnet", ("act", "dc"), num_classes=3, seed=0, unimodal_heads=True)
    data = separable_batches(tiny, 6)
    hist = fit(model, data, TrainConfig(lr=1e-2, epochs=8, grad_accum=2, seed=0, unimodal_weight=1.0),
               device="cpu", log=None)
    assert hist[-1]["train_unimodal"] < 0.8 * hist[0]["train_unimodal"]
    model.eval()
    with torch.no_grad():
        batch = separable_batches(tiny, 1, seed=7)[0]
        e, _ = model.embed(batch)
        act_pred = model.unimodal_heads["act"](e[:, 0]).argmax(-1)
    assert float((act_pred == batch["y"]).float().mean()) > 0.9
    assert model(batch)[0].shape == (8, 3)  # the heads leave the fused prediction's shape alone
    off = fit(build_model(tiny, "magnet", ("act",), num_classes=3, seed=0, unimodal_heads=True), data[:2],
              TrainConfig(epochs=1), device="cpu", log=None)
    assert "train_unimodal" not in off[0]  # weight 0: heads built but no loss


def test_micro_batch_takes_the_same_optimizer_step_as_accumulation(tiny, monkeypatch):
    """48 windows in one forward pass = 6 accumulated passes of 8, on a model without batch statistics, dropout
    or gate noise (and without the per-batch MoE balance term and class weights, which are not additive).
    Plain SGD in place of AdamW, so that the step is the gradient itself: the gradients are compared."""
    import model.training as training

    monkeypatch.setattr(training, "_adamw", lambda params, c: torch.optim.SGD(params, lr=c.lr))
    cfg = tiny.replace(norm="layer", gate_noise=0.0)
    batches = separable_batches(tiny, 6)  # 6 batches of 8
    big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    after = []
    for data, accum in ((batches, 6), ([big], 1)):
        model = build_model(cfg, "magnet", seed=0)
        model.eval()  # no dropout; fit calls train(), which only matters for dropout and batch statistics here
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        hist = fit(model, data, TrainConfig(lr=1.0, epochs=1, grad_accum=accum, aux_weight=0.0, clip=0.0),
                   device="cpu", log=None)
        assert hist[0]["optimizer_steps"] == 1
        after.append({n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert after[0].keys() == after[1].keys()
    assert sum(int(g.abs().sum() > 0) for g in after[0].values()) > len(after[0]) // 2  # a real step
    for n in after[0]:
        assert torch.allclose(after[0][n], after[1][n], atol=1e-6, rtol=1e-4), n


def test_every_loss_term_reaches_the_objective_by_name(tiny):
    """Each named loss term of a batch (cross-entropy, MoE balance, generators' distillation, unimodal heads,
    FedProx) enters the objective with its TrainConfig weight and is reported in the history; the parts that one
    term alone trains (unimodal heads, generators) move only when that term is weighted in."""
    from model.training import Objective

    weights = {"ce": 1.0, "aux": 0.1, "prox": 1.0, "generator": 0.7, "unimodal": 0.3}  # ce, prox: unweighted
    cfg = TrainConfig(lr=1e-2, epochs=1, grad_accum=1, weight_decay=0.0, seed=0, aux_weight=0.1,
                      generator_weight=0.7, unimodal_weight=0.3)

    def new_model():
        return build_model(tiny, "magnet", ("act", "acw"), num_classes=3, seed=0, latent_generators=True,
                           unimodal_heads=True)

    model = new_model().train()
    params = [p for p in model.parameters() if p.requires_grad]
    objective = Objective(model, dataclasses.replace(cfg, proximal_mu=0.5), params, torch.device("cpu"), None, None)
    _, terms = objective.terms(separable_batches(tiny, 1)[0])
    assert tuple(terms) == objective.names == ("ce", "aux", "generator", "unimodal", "prox")
    leaves = {k: v.detach().clone().requires_grad_() for k, v in terms.items()}
    objective.total(leaves).backward()
    assert {k: None if v.grad is None else float(v.grad) for k, v in leaves.items()} == pytest.approx(weights)

    data = separable_batches(tiny, 3)

    def moved_after_fit(c):
        m = new_model()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        hist = fit(m, data, dataclasses.replace(c, proximal_mu=0.5), device="cpu", log=None)
        moved = {n for n, p in m.named_parameters() if not torch.equal(before[n], p)}
        parts = ("unimodal_heads", "generators")
        return hist[0], {part: any(n.startswith(part + ".") for n in moved) for part in parts}

    rec, moved = moved_after_fit(cfg)
    assert moved == {"unimodal_heads": True, "generators": True}
    assert all(rec[f"train_{k}"] > 0 for k in ("ce", "prox", "generator", "unimodal"))
    assert rec["train_loss"] == pytest.approx(sum(w * rec[f"train_{k}"] for k, w in weights.items()), rel=1e-12)
    off = TrainConfig(**{**cfg.to_dict(), "generator_weight": 0.0, "unimodal_weight": 0.0})
    rec, moved = moved_after_fit(off)
    assert moved == {"unimodal_heads": False, "generators": False}
    assert "train_generator" in rec and "train_unimodal" not in rec  # generators report their loss even unweighted

"""Cross-modal latent generators (FedMobile-style): once good enough they fill absent modalities and join the
fusion, only distillation trains them, and it teaches them to reconstruct a modality's embedding."""

import torch
from model_testutils import make_batch

from model import TrainConfig, build_model, fit, trainable_state_keys
from model.generators import LatentGenerators


def test_generator_model_fills_absent_modalities_and_has_no_tokens(tiny):
    model = build_model(tiny, "magnet", seed=0, latent_generators=True).eval()
    assert len(model.missing_tokens) == 0
    keys = trainable_state_keys(model)
    assert {"generators.mean", "generators.var", "generators.quality"} <= set(keys)  # averaged by the server
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:3, 2] = False  # dc absent on half the batch
    batch = make_batch(tiny, b=6, mask=mask)

    def logits_before_and_after_perturbing_the_dc_generator():
        with torch.no_grad():
            before, _ = model(batch)
            for p in model.generators.nets[2].parameters():
                p.add_(0.5)
            after, _ = model(batch)
        return before, after

    # a generator below the quality gate is not used: dc stays out of the fusion
    model.generators.quality.fill_(model.generators.gate - 0.1)
    before, after = logits_before_and_after_perturbing_the_dc_generator()
    torch.testing.assert_close(before, after)
    # above the gate, the generated dc embedding reaches the logits of the samples without dc, and only theirs
    model.generators.quality.fill_(model.generators.gate + 0.1)
    before, after = logits_before_and_after_perturbing_the_dc_generator()
    assert before.shape == (6, 7)
    assert not torch.allclose(before[:3], after[:3])
    torch.testing.assert_close(before[3:], after[3:])
    # the FedAvg model is unchanged: learned tokens, no generators
    plain = build_model(tiny, "magnet", seed=0)
    assert plain.generators is None and len(plain.missing_tokens) == 4


def test_classification_loss_never_reaches_generators(tiny):
    model = build_model(tiny, "magnet", seed=0, latent_generators=True).train()
    model.generators.quality.fill_(1.0)  # generated nodes join the fusion
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[::2, 3] = False
    logits, _ = model(make_batch(tiny, b=8, mask=mask))
    logits.sum().backward()
    grads = [p.grad for p in model.generators.parameters()]
    assert all(g is None or not g.any() for g in grads)
    model.zero_grad()
    model(make_batch(tiny, b=8, mask=mask))
    model.generator_loss.backward()  # distillation does (the zero-initialised output layer first)
    assert all(p.grad is not None and p.grad.any() for p in model.generators.nets[3][-1].parameters())


def test_every_parameter_of_a_generator_model_gets_gradient_in_fit(tiny):
    torch.manual_seed(0)
    model = build_model(tiny, "magnet", seed=0, latent_generators=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    batches = []
    for step in range(6):
        mask = torch.rand(8, 4, generator=torch.Generator().manual_seed(step)) > 0.4
        mask[:, 0] |= ~mask.any(1)
        batches.append(make_batch(tiny, b=8, mask=mask, seed=step))
    hist = fit(model, batches, TrainConfig(lr=1e-2, grad_accum=1, epochs=2), device="cpu", log=None)
    assert hist[-1]["train_generator"] > 0
    unchanged = [n for n, p in params.items() if torch.equal(p.detach(), start[n])]
    assert not unchanged, f"never updated: {unchanged}"


def test_distillation_reduces_reconstruction_loss():
    torch.manual_seed(0)
    gen = LatentGenerators(3, 8)
    m1, m2 = torch.randn(8, 8) / 8**0.5, torch.randn(8, 8) / 8**0.5
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)

    def sample(n=64):  # three views of one latent, shifted and scaled: each is predictable from any other
        a = torch.randn(n, 8)
        return torch.stack([a, 3.0 + a @ m1, 0.1 * torch.tanh(a @ m2)], 1), torch.rand(n, 3) > 0.2

    e, present = sample(512)
    with torch.no_grad():
        gen.train()
        for _ in range(200):  # running statistics from real embeddings (a fresh generator predicts the mean)
            gen.distill_loss(e, present)
        gen.eval()
        first = float(gen.distill_loss(e, present))
    assert 0.8 < first < 1.5  # standardised MSE of predicting the mean: about 1 - R² = 1
    assert not gen.usable().any()
    gen.train()
    for _ in range(300):
        loss = gen.distill_loss(*sample())
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen.eval()
    with torch.no_grad():
        last = float(gen.distill_loss(e, present))
    assert last < 0.3 * first, (first, last)
    assert not gen.usable().any()  # the gate opens only when someone measured the quality on held-out data
    gen.quality.fill_(1.0 - last)
    assert gen.usable().all()
    torch.testing.assert_close(gen.mean[1], torch.full((8,), 3.0) + (e[:, 1] - 3.0).mean(0), atol=0.3, rtol=0)
    # a filled embedding equals the generator's output from the present modalities, and counts as present
    only_a = torch.tensor([[True, False, False]]).expand(512, 3)
    filled, now = gen.fill(e, only_a)
    assert now.all()
    torch.testing.assert_close(filled[:, 0], e[:, 0])
    torch.testing.assert_close(filled[:, 2], gen.generate(e, only_a, 2))


def test_generator_gradients_are_clipped_apart_from_the_model(tiny):
    """However large the distillation loss, the model's own parameters take the same steps: the generators'
    gradients are clipped on their own (one global norm would shrink the classifier's steps with them)."""
    batches = []
    for step in range(4):
        mask = torch.rand(8, 4, generator=torch.Generator().manual_seed(step)) > 0.4
        mask[:, 0] |= ~mask.any(1)
        batches.append(make_batch(tiny, b=8, mask=mask, seed=step))

    def trained(generator_weight):
        torch.manual_seed(0)
        model = build_model(tiny, "magnet", seed=0, latent_generators=True)
        fit(model, batches, TrainConfig(lr=1e-2, grad_accum=1, epochs=1, clip=0.5, generator_weight=generator_weight,
                                        seed=0), device="cpu", log=None)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    small, huge = trained(1.0), trained(1e4)
    model_keys = [n for n in small if not n.startswith("generators.")]
    assert model_keys and all(torch.allclose(small[n], huge[n], atol=1e-6) for n in model_keys)
    assert any(not torch.allclose(small[n], huge[n]) for n in small if n.startswith("generators."))


def test_a_negative_variance_buffer_does_not_generate_nan():
    # averaging a scaled update (global + s·(local − global)) can push a variance buffer below 0
    gen = LatentGenerators(3, 4).eval()
    gen.var[1].fill_(-2.0)
    e, present = torch.randn(5, 3, 4), torch.tensor([[True, False, True]]).expand(5, 3)
    with torch.no_grad():
        out = gen.generate(e, present, 1)
        assert torch.isfinite(out).all() and torch.isfinite(gen.distill_loss(e, present))
        torch.testing.assert_close(out, gen.mean[1].expand(5, 4))  # var 0: the mean, whatever the net says


def test_prediction_objective_distils_the_fused_prediction_into_the_generators_only(tiny):
    """generator_objective="prediction": the KL between the frozen head fed a generated embedding and the model's
    prediction with the real one reaches the generators and nothing else (no weight, no BatchNorm statistic)."""
    cfg = tiny.replace(generator_objective="prediction")
    model = build_model(cfg, "magnet", seed=0, latent_generators=True).train()
    assert model.generators.gate == 0.0  # the prediction gate: a generated node must lower held-out cross-entropy
    batch = make_batch(cfg, b=8)
    e, present = model.embed(batch)
    teacher = model.classifier(model.fusion(e, present)[0]).detach()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    kd = model.prediction_distill_loss(e.detach(), present, teacher)
    assert kd.ndim == 0 and float(kd.detach()) > 0
    kd.backward()
    for name, p in model.named_parameters():
        touched = p.grad is not None and bool(p.grad.any())
        if name.startswith("generators.nets.") and name.endswith(("2.weight", "2.bias")):
            assert touched, f"{name}: the output layers of the generators learn from the prediction"
        elif not name.startswith("generators."):
            assert not touched, f"{name} received gradient from the prediction distillation"
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, buffers[k], msg=f"{k} moved")
    assert model.fusion.training and model.classifier.training  # the frozen pass restores the modes
    # a training forward adds it to the generators' loss; the embedding objective does not
    model.zero_grad()
    torch.manual_seed(1)
    model(batch)
    with_kd = float(model.generator_loss.detach())
    plain = build_model(tiny, "magnet", seed=0, latent_generators=True).train()
    torch.manual_seed(1)
    plain(batch)
    assert with_kd > float(plain.generator_loss.detach()) > 0


def test_prediction_distillation_teaches_the_generator_what_the_fusion_needs(tiny):
    """With the fusion and classifier fixed, training the generators on the prediction objective brings the head's
    answer with a generated dc embedding towards its answer with the real one."""
    torch.manual_seed(0)
    cfg = tiny.replace(generator_objective="prediction")
    model = build_model(cfg, "magnet", seed=0, latent_generators=True).train()
    batches = [make_batch(cfg, b=16, seed=s) for s in range(4)]
    with torch.no_grad():
        data = [(*model.embed(b), None) for b in batches]
        data = [(e, p, model.frozen_head(e, p)) for e, p, _ in data]
    opt = torch.optim.Adam(model.generators.parameters(), lr=3e-3)

    def kd_loss():
        torch.manual_seed(123)  # the same random subsets of inputs every time
        return torch.stack([model.prediction_distill_loss(e, p, t) for e, p, t in data]).mean()

    for e, p, _ in data:  # running statistics first (a fresh generator predicts the mean)
        for _ in range(30):
            model.generators.distill_loss(e, p)
    first = float(kd_loss())
    for _ in range(150):
        loss = kd_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(kd_loss())
    assert last < 0.5 * first, (first, last)


def test_unknown_generator_objective_is_refused(tiny):
    import pytest

    with pytest.raises(ValueError, match="generator_objective"):
        build_model(tiny.replace(generator_objective="logits"), "magnet", latent_generators=True)

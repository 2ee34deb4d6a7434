import pytest
import torch

from model import FUSIONS, MODALITIES, build_model, count_parameters
from model.fusion import SparseMoE
from model.training import unimodal_loss

from model_testutils import make_batch

SUBSETS = [MODALITIES, ("act", "acw", "pm"), ("act", "acw", "dc"), ("act", "pm", "dc"), ("acw", "pm", "dc"),
           ("act",), ("pm",), ("dc", "pm")]


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_shapes_every_fusion_and_subset(fusion, tiny):
    for mods in SUBSETS:
        if fusion == "dart" and not set(mods) & {"dc", "pm"}:
            with pytest.raises(ValueError):
                build_model(tiny, fusion, mods)
            continue
        model = build_model(tiny, fusion, mods, seed=0)
        expected = tuple(m for m in MODALITIES if m in mods and (fusion != "dart" or m in ("dc", "pm")))
        assert model.modalities == expected
        assert set(model.encoders) == set(expected)  # only the configured encoders are built
        for train in (True, False):
            model.train(train)
            logits, aux = model(make_batch(tiny, b=5))
            assert logits.shape == (5, 7) and torch.isfinite(logits).all()
            assert aux.dim() == 0 and torch.isfinite(aux) and float(aux.detach()) >= -1e-6


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_random_masks_including_all_absent(fusion, tiny):
    model = build_model(tiny, fusion, seed=0)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(7, 4, generator=g) > 0.5
    mask[0] = False  # nothing present
    mask[1] = True
    mask[2] = torch.tensor([False, False, False, True])
    for train in (True, False):
        model.train(train)
        logits, aux = model(make_batch(tiny, b=7, mask=mask))
        assert logits.shape == (7, 7) and torch.isfinite(logits).all() and torch.isfinite(aux)


def test_modality_string_and_errors(tiny):
    assert build_model(tiny, "magnet", "pm, act").modalities == ("act", "pm")
    with pytest.raises(ValueError):
        build_model(tiny, "nope")
    with pytest.raises(ValueError):
        build_model(tiny, "magnet", ("act", "eeg"))
    with pytest.raises(ValueError):
        build_model("huge")


def test_absent_modality_is_ignored(tiny):
    """An absent modality's tensor content must not change the prediction (learned token + masking)."""
    model = build_model(tiny, "magnet", seed=0).eval()
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:, 2] = False  # dc absent everywhere
    mask[1, 0] = False  # and act absent in sample 1
    b1 = make_batch(tiny, b=4, mask=mask, seed=3)
    b2 = {k: v.clone() for k, v in b1.items()}
    b2["dc"] = torch.randn_like(b2["dc"]) * 100
    b2["act"][1] = 55.0
    with torch.no_grad():
        assert torch.allclose(model(b1)[0], model(b2)[0], atol=1e-5)
        # a present modality does matter
        b3 = {k: v.clone() for k, v in b1.items()}
        b3["acw"] = torch.randn_like(b3["acw"]) * 3
        assert (model(b1)[0] - model(b3)[0]).abs().max() > 1e-5


@pytest.mark.parametrize("fusion,inert", [("magnet", True), ("attention", True), ("concat", False)])
def test_missing_token_matters_only_to_fusions_that_do_not_mask(fusion, inert, tiny):
    """MAGNET and attention fusion mask absent nodes (graph neighbours, MoE, pooling), so the learned missing token
    cannot reach the logits (and gets no gradient) while some modality is present; concatenation feeds it on."""
    model = build_model(tiny, fusion, seed=0).train()
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:3, 2] = False  # dc absent in half the batch
    mask[4, 0] = False
    batch = make_batch(tiny, b=6, mask=mask, seed=1)
    logits, _ = model(batch)
    logits.pow(2).sum().backward()
    grads = [model.missing_tokens[m].grad for m in ("act", "dc")]
    assert all(g is not None for g in grads)
    assert all(not g.any() for g in grads) == inert
    model.eval()
    with torch.no_grad():
        before, _ = model(batch)
        for p in model.missing_tokens.values():
            p.add_(torch.randn_like(p) * 10)
        after, _ = model(batch)
    assert torch.allclose(before, after) == inert
    assert torch.allclose(before[5], after[5])  # a complete window never sees a token


def test_mixed_batch_matches_per_sample(tiny):
    """Eval outputs of a mixed-mask batch equal those of each sample alone (no row mix-up)."""
    model = build_model(tiny, "magnet", seed=0).eval()
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    batch = make_batch(tiny, b=4, mask=mask, seed=4)
    with torch.no_grad():
        full, _ = model(batch)
        for i in range(4):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            assert torch.allclose(model(one)[0], full[i : i + 1], atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"unimodal_heads": True, "ts_window_stats": True},
                                     {"ts_window_stats": True, "ts_window_stats_norm": True}])
def test_every_trainable_parameter_gets_gradient(tiny, options):
    for fusion in sorted(FUSIONS):
        torch.manual_seed(0)
        model = build_model(tiny, fusion, seed=0, **options).train()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD(params.values(), lr=0.05)
        seen = {n: torch.zeros_like(p) for n, p in params.items()}
        for step in range(8):
            mask = torch.rand(8, 4, generator=torch.Generator().manual_seed(step)) > 0.3
            mask[0] = True
            batch = make_batch(tiny, b=8, mask=mask, seed=step)
            logits, aux = model(batch)
            loss = torch.nn.functional.cross_entropy(logits, batch["y"]) + 0.01 * aux
            if model.unimodal_heads is not None:
                loss = loss + unimodal_loss(model.unimodal_logits, model.unimodal_present, batch["y"])
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    seen[n] += p.grad.abs()
            opt.step()  # LoRA B starts at 0, so LoRA A only gets gradient after a step
            opt.zero_grad()
        dead = [n for n, s in seen.items() if not (s > 0).any()]
        assert not dead, f"{fusion}: no gradient for {dead}"


def test_moe_sparse_matches_dense_and_hits_all_experts():
    torch.manual_seed(0)
    moe = SparseMoE(d=8, hidden=12, n_experts=4, top_k=2, noise=0.0, dropout=0.0, eps=1e-6).eval()
    x = torch.randn(64, 8)
    out, aux = moe(x)
    logits = moe.gate(x)
    top_v, top_i = logits.topk(2, dim=-1)
    w = torch.softmax(top_v, -1)
    dense = torch.stack([e(x) for e in moe.experts], dim=1)  # [N, E, d]
    ref = (dense.gather(1, top_i.unsqueeze(-1).expand(-1, -1, 8)) * w.unsqueeze(-1)).sum(1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert set(top_i.flatten().tolist()) == {0, 1, 2, 3}
    u = torch.softmax(logits, -1).mean(0)
    assert torch.allclose(aux, torch.log(torch.tensor(4.0)) + (u * u.log()).sum(), atol=1e-6)


def test_t5_base_frozen_only_lora_trainable(tiny):
    model = build_model(tiny, "magnet", seed=0)
    for m in ("act", "acw"):
        t5 = model.encoders[m].t5
        names = [n for n, p in t5.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        assert {n.split(".")[-4] for n in names} <= {"q", "k", "v"}
        frozen = [n for n, p in t5.named_parameters() if not p.requires_grad]
        assert any("SelfAttention.o" in n for n in frozen) and any("DenseReluDense" in n for n in frozen)
        assert t5.base_model.model.shared.weight.shape[0] <= 8  # no dead 16M vocabulary table


def test_seeded_determinism_and_fixed_frozen_base(tiny):
    batch = make_batch(tiny, b=4)
    a = build_model(tiny, "magnet", seed=7).eval()
    b = build_model(tiny, "magnet", seed=7).eval()
    with torch.no_grad():
        assert torch.equal(a(batch)[0], b(batch)[0])
    torch.manual_seed(1)
    c = build_model(tiny, "magnet")
    torch.manual_seed(2)
    d = build_model(tiny, "magnet")
    sc, sd = c.state_dict(), d.state_dict()
    frozen = [n for n, p in c.named_parameters() if not p.requires_grad]
    assert frozen
    for n in frozen:
        assert torch.equal(sc[n], sd[n]), n
    trainable = [n for n, p in c.named_parameters() if p.requires_grad and "lora_B" not in n]
    assert any(not torch.equal(sc[n], sd[n]) for n in trainable)
    # the frozen base does not consume the caller's RNG stream either: two models whose frozen T5 bases differ in
    # size alone (d_ff: LoRA sits on q, k, v only) draw the same numbers from it, so they leave the stream in the
    # same state and get the same trainable initialisation
    torch.manual_seed(3)
    f = build_model(tiny, "concat", ("act", "dc"))
    r1 = torch.rand(3)
    torch.manual_seed(3)
    g = build_model(tiny, "concat", ("act", "dc"), t5_d_ff=2 * tiny.t5_d_ff)
    assert torch.equal(r1, torch.rand(3))
    sf, sg = f.state_dict(), g.state_dict()
    assert any(sf[n].shape != sg[n].shape for n in sf if "DenseReluDense" in n)  # the frozen bases differ
    assert all(torch.equal(sf[n], sg[n]) for n, p in f.named_parameters() if p.requires_grad)
    # different base_seed -> different frozen base
    e = build_model(tiny, "magnet", base_seed=1)
    assert not torch.equal(e.state_dict()[frozen[1]], sc[frozen[1]])


def test_paper_preset_parameter_counts():
    with torch.device("meta"):
        model = build_model("paper")
    pc = count_parameters(model)
    print(f"paper preset: total {pc['total']:,} trainable {pc['trainable']:,}")
    # reference: 173,337,446 total / 106,210,662 trainable; we drop its learned 500x512 position
    # tables (sinusoidal instead, -512,000) and conv biases before BatchNorm, add a 2-token vocab
    assert pc["total"] == 172_820_967
    assert pc["trainable"] == 105_692_135
    assert abs(pc["total"] - 173_337_446) / 173_337_446 < 0.005
    assert model.cfg.acc_steps == 500 and model.cfg.frame_steps == 75
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 2 * 393_216


@pytest.mark.parametrize("momentum", [0.1, None])
def test_modality_batchnorm_counts_only_windows_that_have_the_modality(momentum):
    """An absent modality's placeholder must not enter its BatchNorm statistics: otherwise the share of missing
    windows in a batch changes how every present window is normalised (measured: a clean model lost 12 points of
    weighted F1 on test windows with 50 % missing modalities before this)."""
    from model.fusion import ModalityFFN

    torch.manual_seed(0)
    ffn = ModalityFFN(3, 8, dropout=0.0)
    ffn.bn.momentum = momentum
    ffn.train()
    e = torch.randn(10, 3, 8)
    present = torch.ones(10, 3, dtype=torch.bool)
    present[:5, 1] = False
    out = ffn(e, present)
    e2 = e.clone()
    e2[:5, 1] = 1e3  # whatever the absent rows hold
    ffn2 = ModalityFFN(3, 8, dropout=0.0)
    ffn2.load_state_dict({k: v for k, v in ffn.state_dict().items()} | {
        "bn.running_mean": torch.zeros(24), "bn.running_var": torch.ones(24), "bn.num_batches_tracked": torch.tensor(0)})
    ffn2.bn.momentum = momentum
    ffn2.train()
    out2 = ffn2(e2, present)
    assert torch.allclose(out[present], out2[present], atol=1e-6)
    # modality 1's running mean is the (momentum-weighted) mean of its pre-norm features over the present rows
    h = torch.einsum("bi,io->bo", e[5:, 1], ffn.weight[1]) + ffn.bias[1]
    w = 1.0 if momentum is None else momentum
    assert torch.allclose(ffn.bn.running_mean[8:16], w * h.mean(0), atol=1e-5)
    assert torch.allclose(ffn.bn.running_var[8:16], (1 - w) + w * h.var(0), atol=1e-5)
    # every modality present: exactly a plain BatchNorm1d over the M*d features
    ffn.eval()
    ref = torch.nn.functional.gelu(ffn.bn(
        (torch.einsum("bmi,mio->bmo", e, ffn.weight) + ffn.bias).reshape(10, 24)).reshape(10, 3, 8))
    assert torch.allclose(ffn(e, torch.ones(10, 3, dtype=torch.bool)), ref, atol=1e-6)


def test_window_stats_carry_the_posture_the_pooled_tokens_may_lose(tiny):
    """With ts_window_stats the accelerometer head also reads per-axis mean/std/min/max: 4 x 3 more inputs,
    and a window shifted by a constant changes the embedding through them even with the T5 path held fixed."""
    from model.encoders import TimeSeriesEncoder

    plain = TimeSeriesEncoder(tiny, "act")
    stats = TimeSeriesEncoder(tiny.replace(ts_window_stats=True), "act")
    assert stats.head[0].in_features == plain.head[0].in_features + 12
    stats.eval()
    x = torch.randn(4, tiny.acc_steps, 3)
    pooled_dim = plain.head[0].in_features
    with torch.no_grad():
        stats.head[0].weight[:, :pooled_dim] = 0  # silence the T5 path: only the statistics remain
        a, b = stats(x), stats(x + 1.0)
    assert not torch.allclose(a, b)


def test_window_stats_norm_standardises_each_subject_by_its_own_statistics(tiny):
    """With ts_window_stats_norm, a subject whose sensor sits offset and scaled (every window x -> 2x + 3) gets the
    same statistics features as the original once each is evaluated with its own BatchNorm statistics (AdaBN,
    as the ServerApp evaluates every subject); without the norm the offset reaches the embedding."""
    from model.encoders import TimeSeriesEncoder
    from model.training import adapt_batchnorm

    torch.manual_seed(0)
    normed = TimeSeriesEncoder(tiny.replace(ts_window_stats=True, ts_window_stats_norm=True), "act")
    assert isinstance(normed.stats_norm, torch.nn.BatchNorm1d) and normed.stats_norm.num_features == 12
    pooled_dim = 2 * tiny.t5_d_model
    with torch.no_grad():
        normed.head[0].weight[:, :pooled_dim] = 0  # silence the T5 path: only the statistics remain
    x = torch.randn(32, tiny.acc_steps, 3)

    def embed_own_subject(windows):
        adapt_batchnorm(_Wrap(normed), [{"act": windows, "y": torch.zeros(len(windows))}], "cpu")
        with torch.no_grad():
            return normed.eval()(windows)

    a, b = embed_own_subject(x), embed_own_subject(2 * x + 3)
    assert torch.allclose(a, b, atol=1e-3)
    with torch.no_grad():  # the same windows under one subject's statistics: the offset shows
        assert not torch.allclose(normed(x), normed(2 * x + 3), atol=1e-2)


def test_window_stats_norm_trains_on_a_lone_window_and_needs_the_statistics(tiny):
    """A batch where one window has the sensor has no batch statistics: the running ones are used, not an error."""
    from model.encoders import TimeSeriesEncoder

    enc = TimeSeriesEncoder(tiny.replace(ts_window_stats=True, ts_window_stats_norm=True), "act").train()
    out = enc(torch.randn(1, tiny.acc_steps, 3))
    out.sum().backward()
    assert out.shape == (1, tiny.d_emb) and enc.stats_norm.weight.grad is not None
    with pytest.raises(ValueError, match="needs ts_window_stats"):
        TimeSeriesEncoder(tiny.replace(ts_window_stats_norm=True), "act")


class _Wrap(torch.nn.Module):
    """adapt_batchnorm drives a whole model with batch dicts; this feeds the encoder its modality."""

    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, batch):
        return self.enc(batch["act"])

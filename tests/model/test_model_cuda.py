"""The CUDA path: device choice, mixed precision, gradients under a GradScaler, CPU/GPU agreement.

Skipped where no GPU is present (CI); docs/gpu.md gives the command that runs them on a GPU machine and
what they measured there.
"""

import pytest
import torch

from model import TrainConfig, build_model, evaluate, fit
from model.training import _amp, grad_scaler, predict
from model_testutils import make_batch, separable_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (docs/gpu.md)")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 matmuls/convolutions differ from the CPU by ~1e-3; the agreement test compares true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_the_apps_pick_the_gpu():
    from fedtime import task

    assert task.device().type == "cuda"
    bf16 = torch.cuda.is_bf16_supported()
    assert _amp("auto", torch.device("cuda")) == ((torch.bfloat16, False) if bf16 else (torch.float16, True))
    assert _amp("fp16", torch.device("cuda")) == (torch.float16, True)  # fp16 always with a GradScaler
    assert _amp("auto", torch.device("cpu")) == (None, False)


def test_cuda_forward_matches_cpu_in_fp32(tiny):
    model = build_model(tiny, "magnet", seed=0, latent_generators=True).eval()
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = mask[4, 1:] = False  # generators fill absent modalities on both devices
    batch = make_batch(tiny, b=6, mask=mask)
    with torch.no_grad():
        cpu_logits, cpu_aux = model(batch)
        model.cuda()
        gpu_logits, gpu_aux = model({k: v.cuda() for k, v in batch.items()})
    assert gpu_logits.device.type == "cuda"
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(gpu_aux.cpu(), cpu_aux, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_every_trainable_parameter_gets_a_finite_gradient_under_autocast(tiny, amp):
    from model.training import _autocast

    dtype, use_scaler = _amp(amp, torch.device("cuda"))
    torch.manual_seed(0)
    model = build_model(tiny, "magnet", seed=0, latent_generators=True).cuda().train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=0.05)
    scaler = grad_scaler() if use_scaler else None
    seen = {n: torch.zeros_like(p) for n, p in params.items()}
    skipped = 0
    for step in range(12):
        mask = torch.rand(8, 4, generator=torch.Generator().manual_seed(step)) > 0.3
        mask[0] = True
        batch = {k: v.cuda() for k, v in make_batch(tiny, b=8, mask=mask, seed=step).items()}
        with _autocast(torch.device("cuda"), dtype):
            logits, aux = model(batch)
        assert logits.dtype == dtype  # autocast is really on
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["y"]) + 0.01 * aux.float() \
            + model.generator_loss.float()
        assert torch.isfinite(loss)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        if finite:
            for n, g in grads.items():
                seen[n] += g.abs()
        else:
            # fp16 overflow while the scale is still too large: the step must be skipped and the scale back off
            assert scaler is not None, f"{amp}: non-finite gradients without a GradScaler"
            skipped += 1
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            assert (scaler.get_scale() < scale) == (not finite)  # backs off exactly on the skipped steps
        else:
            opt.step()
        opt.zero_grad()
        assert all(torch.isfinite(p).all() for p in params.values()), "a skipped step must leave the weights finite"
    assert skipped <= 2  # torch's default first scale (2**16) skipped 7 of these 12 steps
    dead = [n for n, s in seen.items() if not (s > 0).any()]
    assert not dead, f"{amp}: no gradient for {dead}"
    assert all(p.is_cuda for p in model.parameters())


@pytest.mark.parametrize("amp", ["auto", "fp16", "bf16", "off"])
def test_fit_learns_on_cuda(tiny, amp):
    """The one training loop the ClientApp and the centralized trainer share, on the GPU."""
    torch.manual_seed(0)
    model = build_model(tiny, "magnet", ("act", "dc"), num_classes=3, seed=0)
    train, val = separable_batches(tiny, 6), separable_batches(tiny, 2, seed=7)
    hist = fit(model, train, TrainConfig(lr=1e-2, epochs=10, grad_accum=2, seed=0, amp=amp), device="cuda",
               val_loader=val, log=None)
    assert hist[-1]["train_ce"] < 0.5 * hist[0]["train_ce"]
    assert hist[-1]["train_accuracy"] > 0.9
    assert sum(h["amp_skipped_steps"] for h in hist) <= (2 if amp == "fp16" else 0)
    logits, labels, _ = predict(model, val, "cuda", amp=amp)
    assert logits.device.type == "cpu" and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    m = evaluate(model, val, "cuda", amp=amp)
    assert m["accuracy"] > 0.9 and m["n"] == 16

import pytest
import torch

from model import (
    build_model,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    state_nbytes,
    trainable_state,
    trainable_state_keys,
)
from model.state import model_from_checkpoint
from model_testutils import make_batch


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_trainable_state_contents(tiny, norm):
    model = build_model(tiny.replace(norm=norm), "magnet", seed=0)
    keys = trainable_state_keys(model)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen and not (set(keys) & frozen)  # no frozen T5 base weight travels
    assert trainable <= set(keys)
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    bn = [k for k in keys if k.endswith(("running_mean", "running_var"))]
    assert all(k in model.state_dict() for k in bn)
    assert bool(bn) == (norm == "batch")  # BatchNorm statistics travel; a per-sample norm has none
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    assert set(keys) == set(trainable) | set(bn)
    st = trainable_state(model)
    assert list(st) == keys and all(v.device.type == "cpu" for v in st.values())
    full = state_nbytes({k: v.clone() for k, v in model.state_dict().items()})
    assert 0 < state_nbytes(st) < full


def test_load_trainable_state_roundtrip_and_strict(tiny):
    tiny = tiny.replace(norm="batch")
    a = build_model(tiny, "magnet", seed=1)
    b = build_model(tiny, "magnet", seed=2)
    a.train()
    a(make_batch(tiny, b=4))  # move BatchNorm statistics away from their init
    load_trainable_state(b, trainable_state(a))
    a.eval(), b.eval()
    batch = make_batch(tiny, b=4, seed=5)
    with torch.no_grad():
        assert torch.equal(a(batch)[0], b(batch)[0])  # frozen base equal by construction
    st = trainable_state(a)
    extra = dict(st, bogus=torch.zeros(1))
    with pytest.raises(KeyError):
        load_trainable_state(b, extra)
    missing = dict(st)
    missing.pop(next(iter(missing)))
    with pytest.raises(KeyError):
        load_trainable_state(b, missing)
    bad = dict(st)
    k = next(iter(bad))
    bad[k] = torch.zeros(3, 3, 3)
    with pytest.raises(ValueError):
        load_trainable_state(b, bad)
    # numpy arrays (what Flower ArrayRecords hand back) are accepted
    load_trainable_state(b, {k: v.numpy() for k, v in st.items()})


@pytest.mark.parametrize("trainable_only", [False, True])
def test_checkpoint_roundtrip(tmp_path, tiny, trainable_only):
    a = build_model(tiny, "magnet", ("act", "pm"), seed=3)
    a.train()
    a(make_batch(tiny, b=4))
    path = save_checkpoint(tmp_path / "m.safetensors", a, {"round": 4, "note": "x"}, trainable_only=trainable_only)
    b = build_model(tiny, "magnet", ("act", "pm"), seed=9)
    state, meta = load_checkpoint(path, b)
    assert meta == {"round": 4, "note": "x"}
    a.eval(), b.eval()
    batch = make_batch(tiny, b=3, seed=1)
    with torch.no_grad():
        assert torch.equal(a(batch)[0], b(batch)[0])
        c = model_from_checkpoint(path).eval()
        assert c.modalities == ("act", "pm")
        assert torch.equal(a(batch)[0], c(batch)[0])


def test_generator_model_rebuilds_from_a_trainable_only_checkpoint(tmp_path, tiny):
    a = build_model(tiny, "magnet", seed=3, latent_generators=True)
    a.train()
    a(make_batch(tiny, b=4))  # moves the generators' running statistics, which must travel too
    path = save_checkpoint(tmp_path / "g.safetensors", a, trainable_only=True)
    c = model_from_checkpoint(path).eval()
    assert c.generators is not None
    torch.testing.assert_close(c.generators.mean, a.generators.mean)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[:, 1] = False
    batch = make_batch(tiny, b=3, seed=1, mask=mask)
    with torch.no_grad():
        assert torch.equal(a.eval()(batch)[0], c(batch)[0])


def test_checkpoint_without_a_model_header_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="does not describe its model"):
        model_from_checkpoint(tmp_path / "bare.safetensors")

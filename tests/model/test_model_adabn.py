import torch

from model import adapt_batchnorm, build_model, trainable_state
from model_testutils import make_batch


def test_adapt_batchnorm_replaces_statistics_with_the_loaders_and_keeps_weights(tiny):
    model = build_model(tiny, "magnet", seed=0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    model.eval()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    shifted = make_batch(tiny, b=16, seed=3)
    for m in ("act", "acw", "dc", "pm"):
        shifted[m] = shifted[m] * 3 + 5  # another "subject"
    n = adapt_batchnorm(model, [shifted, make_batch(tiny, b=1, seed=4)], "cpu")
    assert n == 16  # the single-window batch is skipped
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert not model.training and not any(m.training for m in bns)  # mode restored
    assert all(m.momentum == 0.1 for m in bns)
    # the statistics are now those of the shifted batch: re-adapting on it changes nothing
    before = {k: v.clone() for k, v in trainable_state(model).items() if "running" in k}
    adapt_batchnorm(model, [shifted], "cpu")
    after = {k: v for k, v in trainable_state(model).items() if "running" in k}
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)
    fresh = build_model(tiny, "magnet", seed=0)
    assert any(not torch.allclose(after[k], trainable_state(fresh)[k]) for k in after)


def test_evaluate_per_subject_pools_predictions_and_leaves_the_state_alone(tiny):
    import numpy as np

    from model import evaluate, evaluate_per_subject

    model = build_model(tiny, "magnet", seed=0).eval()
    a, b = make_batch(tiny, b=8, seed=1), make_batch(tiny, b=6, seed=2)
    for m in ("act", "acw", "dc", "pm"):
        b[m] = b[m] * 2 + 3  # a second "subject" with other statistics
    state = {k: v.clone() for k, v in trainable_state(model).items()}
    plain = evaluate_per_subject(model, {1: [a], 2: [b]}, "cpu", adapt_bn=False)
    np.testing.assert_allclose(plain["probabilities"],
                               np.concatenate([evaluate(model, [a], "cpu")["probabilities"],
                                               evaluate(model, [b], "cpu")["probabilities"]]), rtol=1e-5)
    assert plain["n"] == 14
    adapted = evaluate_per_subject(model, {1: [a], 2: [b]}, "cpu", adapt_bn=True)
    assert not np.allclose(adapted["probabilities"], plain["probabilities"])  # each subject's own statistics
    assert all(torch.equal(v, state[k]) for k, v in trainable_state(model).items())

"""The client side of user-level DP (docs/privacy.md) through the real training path: what a client sends when the
round's config carries `dp-clip` is the global state plus its update clipped to that norm, plus its share of the
noise when the server asks for it."""

from __future__ import annotations

import numpy as np
import pytest

from client_app import client_app
from client_testutils import start_state
from fedtime.privacy import l2_norm, update

SUBJECT = 2


def _numpy(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def test_a_client_clips_its_update_and_adds_its_share_of_the_noise(cfg):
    start = start_state(cfg)
    free, _ = client_app.train_subject(cfg, SUBJECT, start, {"server-round": 1}, log=lambda s: None)
    trained = l2_norm(update(_numpy(free), _numpy(start)))
    clip = trained / 10
    clipped, _ = client_app.train_subject(cfg, SUBJECT, start, {"server-round": 1, "dp-clip": clip,
                                                                 "dp-noise-std": 0.0}, log=lambda s: None)
    assert set(clipped) == set(free)
    sent = update(_numpy(clipped), _numpy(start))
    assert l2_norm(sent) <= clip and l2_norm(sent) == pytest.approx(clip, rel=1e-3)
    # the same local training, scaled down: BatchNorm statistics included
    full = update(_numpy(free), _numpy(start))
    for k in ("classifier.2.running_var", "classifier.2.running_mean"):
        np.testing.assert_allclose(sent[k], full[k] / 10, rtol=1e-3, atol=1e-7)
    noisy, _ = client_app.train_subject(cfg, SUBJECT, start, {"server-round": 1, "dp-clip": clip,
                                                               "dp-noise-std": 0.05}, log=lambda s: None)
    values = np.concatenate([(a - b).ravel() for a, b in zip(update(_numpy(noisy), _numpy(start)).values(),
                                                             sent.values())])
    assert np.std(values) == pytest.approx(0.05, rel=0.05)  # the noise on top of the clipped update

import re
import tomllib
from pathlib import Path

import pytest

from fedtime import task
from fedtime.config import FUSION_NAMES, PRESET_NAMES, SECTIONS, ConfigError, RunConfig, flatten_tables

ROOT = Path(__file__).resolve().parents[2]


def pyproject_run_config() -> dict:
    """As Flower passes it: the app config with strategy tables flattened to dotted keys."""
    return flatten_tables(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_are_the_dataclass_defaults():
    cfg = RunConfig.from_run_config(pyproject_run_config())
    assert cfg == RunConfig()
    assert {k for k in pyproject_run_config() if "." not in k} == set(RunConfig().to_run_config())
    assert cfg.to_run_config() == pyproject_run_config()  # strategy tables kept as given
    assert (cfg.num_server_rounds, cfg.local_epochs, cfg.clients_per_round, cfg.batch_size, cfg.grad_accum,
            cfg.lr, cfg.weight_decay, cfg.split_seed) == (10, 5, 9, 8, 6, 0.0, 1e-4, 42)


def test_lr_zero_is_the_presets_own():
    """The compact preset trains from scratch at 1e-3; the paper preset keeps the paper's 1e-4; a set lr wins."""
    assert task.train_config(RunConfig()).lr == 1e-3
    assert task.train_config(RunConfig(model_preset="paper")).lr == 1e-4
    assert task.train_config(RunConfig(lr=5e-4)).lr == 5e-4
    with pytest.raises(ConfigError, match="'lr'"):
        RunConfig.from_run_config({"lr": -1e-3})


@pytest.mark.parametrize("overrides, message", [
    ({"num-server-round": 3}, "unknown run-config key 'num-server-round'"),
    ({"strategy-options": "x"}, "unknown run-config key 'strategy-options'"),
    ({"lr": "fast"}, "'lr' must be of type float"),
    ({"local-epochs": 1.5}, "'local-epochs' must be of type int"),
    ({"batch-size": True}, "'batch-size' must be of type int"),
    ({"modalities": "act,xyz"}, "'modalities'"),
    ({"clients-per-round": 0}, "'clients-per-round' must be >= 1"),
    ({"normalization": "minmax"}, "'normalization'"),
    ({"amp": "fp32"}, "'amp' must be one of"),
    ({"modality-dropout": 1.0}, "'modality-dropout' must be < 1"),
    ({"modality-dropout": -0.1}, "'modality-dropout' must be >= 0"),
    ({"lr": float("inf")}, "'lr' must be a finite number"),
    ({"weight-decay": float("nan")}, "'weight-decay' must be a finite number"),
    ({"augment-sigma": float("inf")}, "'augment-sigma' must be a finite number"),
    ({"round-timeout": float("inf")}, "'round-timeout' must be a finite number"),
    ({"poison-scale": float("nan")}, "'poison-scale' must be a finite number"),
    ({"unimodal-weight": -1.0}, "'unimodal-weight' must be >= 0"),
    ({"acc-window-stats": 1}, "'acc-window-stats' must be of type bool"),
    ({"acc-window-stats": False, "acc-window-stats-norm": True},
     "'acc-window-stats-norm' normalises the window statistics"),
])
def test_bad_keys_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_run_config({**pyproject_run_config(), **overrides})


def test_training_keys_reach_the_shared_training_loop():
    """One route: the run config's keys and what a strategy sends in the round's config, through task.train_config."""
    cfg = RunConfig.from_run_config({"modality-dropout": 0.5, "lr": 3e-4})
    train = task.train_config(cfg, {"generator-weight": 2.0, "proximal-mu": 0.1, "server-round": 3})
    assert (train.modality_dropout, train.lr, train.generator_weight, train.proximal_mu) == (0.5, 3e-4, 2.0, 0.1)
    plain = task.train_config(RunConfig())
    assert (plain.modality_dropout, plain.generator_weight, plain.proximal_mu) == (0.0, 1.0, 0.0)
    assert task.train_config(RunConfig.from_run_config({"unimodal-weight": 0.5})).unimodal_weight == 0.5


def test_model_keys_reach_every_party_s_model():
    """The ServerApp, the ClientApps and the centralized trainer all build the model from `model_options`."""
    from fedtime import task

    cfg = RunConfig.from_run_config({"model-preset": "tiny", "unimodal-weight": 1.0, "acc-window-stats": True,
                                     "acc-window-stats-norm": True})
    model = task.model_for(cfg)
    assert set(model.unimodal_heads) == set(model.modalities)
    assert model.encoders["act"].window_stats and model.generators is None
    assert model.encoders["act"].stats_norm is not None
    plain = task.model_for(RunConfig.from_run_config({"model-preset": "tiny", "acc-window-stats": False}))
    assert plain.unimodal_heads is None and not plain.encoders["act"].window_stats
    assert plain.encoders["act"].stats_norm is None
    # a strategy's model options travel in the round's config and reach the client's model
    sent = task.options_to_message({"latent_generators": True, "generator_objective": "prediction"})
    assert sent == {"model.latent_generators": True, "model.generator_objective": "prediction"}
    with_generators = task.model_for(cfg, task.options_from_message({**sent, "server-round": 1}))
    assert with_generators.generators is not None and with_generators.cfg.generator_objective == "prediction"


def test_int_accepted_for_float_and_round_trip():
    cfg = RunConfig.from_run_config({"lr": 1, "modalities": "act,pm"})
    assert cfg.lr == 1.0 and cfg.modality_list == ("act", "pm")
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


def test_micro_batch_keeps_the_optimizer_batch():
    """micro-batch only splits the optimizer batch (batch-size x grad-accum) into forward passes."""
    assert RunConfig().optimizer_batch == 48
    default = task.train_config(RunConfig())
    assert (default.batch_size, default.grad_accum) == (48, 1)  # one pass per optimizer step
    paper = task.train_config(RunConfig.from_run_config({"micro-batch": 8}))
    assert (paper.batch_size, paper.grad_accum) == (8, 6)
    assert task.train_config(RunConfig.from_run_config({"micro-batch": 16})).grad_accum == 3
    with pytest.raises(ConfigError, match="micro-batch"):
        RunConfig.from_run_config({"micro-batch": 20})
    with pytest.raises(ConfigError, match="micro-batch"):
        RunConfig.from_run_config({"micro-batch": -1})


def test_subject_normalization_is_a_choice():
    assert RunConfig.from_run_config({"normalization": "subject"}).normalization == "subject"
    with pytest.raises(ConfigError, match="normalization"):
        RunConfig.from_run_config({"normalization": "per-subject"})


def test_paper_conf_holds_the_papers_literal_settings():
    """conf/paper.toml, key by key: the paper's model, optimizer, batching, schedule and preprocessing."""
    conf = tomllib.loads((ROOT / "conf" / "paper.toml").read_text())
    expected = {"model-preset": "paper", "lr": 1e-4, "weight-decay": 1e-4, "batch-size": 8, "grad-accum": 6,
                "micro-batch": 8, "num-server-rounds": 10, "local-epochs": 5, "clients-per-round": 9, "patience": 6,
                "average-last-rounds": 0, "normalization": "per_window", "augment-sigma": 0.01,
                "eval-bn-stats": "global", "acc-window-stats": False, "acc-window-stats-norm": False,
                "modality-dropout": 0.0, "unimodal-weight": 0.0, "split-seed": 42}
    assert conf == expected
    cfg = RunConfig.from_run_config({**pyproject_run_config(), **conf})
    train = task.train_config(cfg)
    assert (train.lr, train.batch_size, train.grad_accum) == (1e-4, 8, 6)


def test_every_shared_key_is_in_one_section():
    keys = [k for section in SECTIONS.values() for k in section]
    assert sorted(keys) == sorted(RunConfig().to_run_config()) and len(keys) == len(set(keys))


def test_the_config_names_what_the_model_package_has():
    """The config checks preset and fusion names without importing torch; they are the model package's."""
    from model import FUSIONS, PRESETS

    assert set(PRESET_NAMES) == set(PRESETS) and set(FUSION_NAMES) == set(FUSIONS)


def test_reading_a_run_config_imports_neither_flower_nor_torch():
    import subprocess
    import sys

    code = ("import sys; from fedtime.config import RunConfig; "
            "cfg = RunConfig.from_run_config({'lr': 1e-3, 'fedprox.proximal-mu': 0.1}); cfg.learning_rate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_simulation_makes_relative_paths_absolute_from_where_it_starts(tmp_path, monkeypatch):
    """The app runs in the simulation's own folder: `outputs` or `resume="outputs/<run>"` must not be resolved
    there (a run started by `make run` landed in outputs/.simulation/outputs/)."""
    from pathlib import Path

    from server_app.simulation import absolute_paths

    monkeypatch.chdir(tmp_path)
    repo = Path(__file__).resolve().parents[2]
    out = absolute_paths({"resume": "outputs/run-1", "data-path": "data/MEx.zip", "lr": 0.1}, repo)
    assert out == {"resume": str(tmp_path / "outputs/run-1"), "data-path": str(tmp_path / "data/MEx.zip"),
                   "lr": 0.1, "output-dir": str(tmp_path / "outputs")}  # the app's default, made absolute
    assert absolute_paths({"output-dir": "/abs/out", "data-path": ""}, repo) == {"output-dir": "/abs/out",
                                                                                 "data-path": ""}

"""`bench/strategies.py --extend`: which finished run a longer cell continues, and the copy it resumes."""

import importlib.util
import json
from pathlib import Path

from fedtime.results import new_results, read_results

_spec = importlib.util.spec_from_file_location(
    "bench_strategies", Path(__file__).resolve().parents[2] / "bench" / "strategies.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _run(out: Path, name: str, *, finished: bool = True, checkpoint: bool = True, done: int = 1,
         bad_rounds: int = 0) -> Path:
    d = out / name
    (d / "checkpoint").mkdir(parents=True)
    if checkpoint:
        (d / "checkpoint" / "state.json").write_text(json.dumps(
            {"round": done, "early_stopping": {"patience": 6, "best_round": done - bad_rounds,
                                               "bad_rounds": bad_rounds}}))
    (d / "best_model.safetensors").write_bytes(b"x")
    res = new_results("federated", name, {}, status="completed" if finished else "running",
                      test={"weighted_f1": 0.5} if finished else None)
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_shorter_run_is_the_longest_finished_one_with_a_checkpoint(tmp_path):
    _run(tmp_path, "fedavg-missing50-compact-r5e5-s0")
    best = _run(tmp_path, "fedavg-missing50-compact-r10e5-s0")
    _run(tmp_path, "fedavg-missing50-compact-r15e5-s0", finished=False)      # never finished
    _run(tmp_path, "fedavg-missing50-compact-r12e5-s0", checkpoint=False)    # nothing to resume
    _run(tmp_path, "fedavg-missing50-compact-r20e5-s0")                      # not shorter
    _run(tmp_path, "fedavg-missing50-compact-r10e3-s0")                      # other epochs
    _run(tmp_path, "fedavg-missing50-compact-r10e5-s1")                      # other seed
    _run(tmp_path, "fedavg-missing50-train-compact-r10e5-s0")                # other scenario
    _run(tmp_path, "fedavg-modality-missing50-compact-r10e5-s0")             # other strategy
    assert bench.shorter_run(tmp_path, "fedavg", "missing50", "compact", 20, 5, 0) == best
    assert bench.shorter_run(tmp_path, "fedavg", "missing50", "compact", 5, 5, 0) is None
    assert bench.shorter_run(tmp_path, "fedprox", "missing50", "compact", 20, 5, 0) is None
    assert bench.shorter_run(tmp_path / "absent", "fedavg", "missing50", "compact", 20, 5, 0) is None


def test_extend_copy_keeps_the_shorter_run_and_marks_the_copy_unfinished(tmp_path):
    src = _run(tmp_path, "fedavg-clean-compact-r10e5-s0")
    dst = tmp_path / "fedavg-clean-compact-r20e5-s0"
    dst.mkdir()
    (dst / "stale").write_text("from an interrupted attempt")
    assert bench.extend_copy(src, dst) == dst
    res = read_results(dst / "results.json")
    assert res["run"] == dst.name and res["extended_from"] == src.name
    assert res["status"] == "running" and res["test"] is None
    assert (dst / "checkpoint" / "state.json").exists()
    assert not (dst / "best_model.safetensors").exists() and not (dst / "stale").exists()
    assert json.loads((src / "results.json").read_text())["test"] == {"weighted_f1": 0.5}


def test_a_longer_patience_continues_the_run_early_stopping_ended(tmp_path):
    stopped = _run(tmp_path, "fedavg-missing50-compact-r30e5-s1", done=19, bad_rounds=6)
    _run(tmp_path, "fedavg-missing50-compact-r10e5-s1", done=10)                   # fewer rounds trained
    _run(tmp_path, "fedavg-missing50-compact-r30e5-s2", done=16, bad_rounds=6)     # other seed
    _run(tmp_path, "fedavg-missing50-compact-r40e5-s1", done=25, bad_rounds=6)     # more rounds asked
    assert bench.shorter_run(tmp_path, "fedavg", "missing50", "compact", 30, 5, 1, patience=0) == stopped
    assert bench.shorter_run(tmp_path, "fedavg", "missing50", "compact", 30, 5, 1, patience=12) == stopped
    # a patience that would stop it again at once: the next-longest run instead
    assert bench.shorter_run(tmp_path, "fedavg", "missing50", "compact", 30, 5, 1, patience=6).name == \
        "fedavg-missing50-compact-r10e5-s1"
    # without --patience a cell at the same rounds is not "shorter"
    assert bench.shorter_run(tmp_path, "fedavg", "missing50", "compact", 30, 5, 1).name == \
        "fedavg-missing50-compact-r10e5-s1"
    # a -pN cell can itself be continued, and never continues itself
    own = _run(tmp_path, "fedavg-missing50-compact-r30e5-s1-p0", finished=False, done=22)
    assert bench.shorter_run(tmp_path, "fedavg", "missing50", "compact", 30, 5, 1, patience=0) == stopped
    assert bench.shorter_run(tmp_path, "fedavg", "missing50", "compact", 40, 5, 1, patience=0).name == \
        "fedavg-missing50-compact-r40e5-s1"
    assert own.exists()
    # a run that already trained every round under the old patience is itself the longer-patience answer
    full = _run(tmp_path, "fedmobile-missing50-compact-r30e5-s2", done=30, bad_rounds=0)
    assert bench.shorter_run(tmp_path, "fedmobile", "missing50", "compact", 30, 5, 2, patience=0) == full
    assert bench.shorter_run(tmp_path, "fedmobile", "missing50", "compact", 30, 5, 2) is None


def test_an_interrupted_cell_is_resumed_not_lost(tmp_path):
    stopped = _run(tmp_path, "fedmobile-missing50-compact-r30e5-s1-p0", finished=False, done=20)
    assert bench.interrupted_round(stopped) == 20
    finished = _run(tmp_path, "fedavg-missing50-compact-r30e5-s1-p0", done=30)
    assert bench.interrupted_round(finished) is None
    never_checkpointed = _run(tmp_path, "fedavg-clean-compact-r30e5-s1-p0", finished=False, checkpoint=False)
    assert bench.interrupted_round(never_checkpointed) is None
    assert bench.interrupted_round(tmp_path / "absent") is None

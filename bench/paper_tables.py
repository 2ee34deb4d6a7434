"""The MHARFedLLM paper's Tables 1 and 2 (test weighted F1, centralized and federated) beside ours, from a grid of
cells that this runner trains, stores and reads back.

    python bench/paper_tables.py                         # every row of both tables (split 42; MAGNET also 1, 2)
    python bench/paper_tables.py --rows magnet,concat --modes centralized
    python bench/paper_tables.py --paper-literal         # + the centralized MAGNET row with conf/paper.toml
    python bench/paper_tables.py --report-only           # train nothing: tables, figures, t-SNE from stored cells

A cell is (table row: fusion x sensors) x mode x split seed, stored as `<workdir>/<row>-<mode>-<preset>-split<seed>`:
federated = the real `flwr run` Ray simulation with 21 SuperNodes (`server_app.simulation.run_simulation`, as
bench/headline.py), centralized = `python -m model.train` in a subprocess; both with pyproject.toml's recipe and only
the row's run-config keys (`fusion`, `modalities`) and `split-seed` changed. Finished cells (results.json with test
figures) are read back, never recomputed; an interrupted federated cell resumes from its checkpoint, an interrupted
centralized one is trained again (it has no checkpoint to resume). A failed cell is recorded in
`<workdir>/failures.json` with the end of its log and the grid goes on; the report marks it. A finished run stored
elsewhere with exactly a cell's settings (`--adopt-from`, default outputs/bench-headline: the README's headline runs)
is copied in as that cell, recording where it came from.

Every invocation ends by writing the report (`--report-to`, default docs/results.md) with a bar chart beside it
(`figures/paper_tables.png`), a t-SNE of the fused test embeddings of the best stored federated MAGNET cell
(`<run>/plots/tsne_test.png`, copied to `figures/`), prints the tables, and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # after the project: bench/model.py must not shadow `model`

from fedtime.config import RunConfig, parse_run_config  # noqa: E402
from fedtime.results import read_results, write_json, write_results  # noqa: E402
from _cells import federated_cell, finished, mean_std  # noqa: E402

ALL = "act,acw,dc,pm"
PAPER_TOML = ROOT / "conf" / "paper.toml"
MODES = ("centralized", "federated")
MAGNET_SEEDS = (42, 1, 2)  # 42 = the paper's subject split
CENTRAL_EPOCHS = 25  # python -m model.train's default
NODES = 21


@dataclass(frozen=True)
class Row:
    name: str
    table: int
    label: str
    fusion: str
    modalities: str
    paper: tuple[float | None, float | None]  # the paper's (centralized, federated) weighted F1
    literal: bool = False  # conf/paper.toml's settings (centralized only)


ROWS: dict[str, Row] = {r.name: r for r in (
    # Table 1: fusion methods, all four sensors
    Row("magnet", 1, "MAGNET (Time-MAGNET)", "magnet", ALL, (0.934, 0.881)),
    Row("concat", 1, "Concat", "concat", ALL, (0.876, 0.801)),
    Row("attention", 1, "Attention", "attention", ALL, (0.897, 0.836)),
    Row("lstm", 1, "LSTM", "lstm", ALL, (0.822, 0.776)),
    Row("dart", 1, "DART-CNN", "dart", ALL, (0.874, 0.651)),
    # Table 2: MAGNET on three of the four sensors
    Row("magnet-act-acw-pm", 2, "act + acw + pm", "magnet", "act,acw,pm", (0.783, 0.721)),
    Row("magnet-act-acw-dc", 2, "act + acw + dc", "magnet", "act,acw,dc", (0.906, 0.838)),
    Row("magnet-act-pm-dc", 2, "act + pm + dc", "magnet", "act,pm,dc", (0.927, 0.872)),
    Row("magnet-acw-pm-dc", 2, "acw + pm + dc", "magnet", "acw,pm,dc", (0.911, 0.851)),
    # with --paper-literal: the paper's literal settings, centralized
    Row("magnet-paper-literal", 1, "MAGNET, the paper's literal settings (conf/paper.toml)", "magnet", ALL,
        (0.934, None), literal=True),  # centralized only
)}
DEFAULT_ROWS = [n for n, r in ROWS.items() if not r.literal]

# keys that say where and how fast a run ran, not what it trained: ignored when comparing a stored run's settings
IGNORED_KEYS = {"output-dir", "run-name", "resume", "data-path", "num-threads", "tensorboard", "discovery-timeout",
                "round-timeout", "min-train-replies"}
# python -m model.train's own arguments that change what it trains (the run config aside), with their defaults
CENTRAL_ARGS = {"monitor": "weighted_f1", "label_smoothing": 0.0, "swa_start": 0, "subject_batches": "auto",
                "no_class_weights": False}


def resolve_row(name: str) -> Row:
    """A row by name; `magnet-<sensors>` in any sensor order (magnet-pm-dc-act = magnet-act-pm-dc)."""
    if name in ROWS:
        return ROWS[name]
    if name.startswith("magnet-"):
        wanted = set(name.split("-")[1:])
        for r in ROWS.values():
            if r.fusion == "magnet" and not r.literal and r.name != "magnet" and set(r.modalities.split(",")) == wanted:
                return r
    raise SystemExit(f"unknown row {name!r}; choose from {', '.join(ROWS)} (or table1, table2)")


def parse_rows(text: str, literal: bool) -> list[Row]:
    names: list[str] = []
    for n in (s.strip() for s in text.split(",") if s.strip()):
        names += [r.name for r in ROWS.values() if r.table == int(n[-1]) and not r.literal] \
            if n in ("table1", "table2") else [resolve_row(n).name]
    if literal and "magnet-paper-literal" not in names:
        names.append("magnet-paper-literal")
    return [ROWS[n] for n in dict.fromkeys(names)]


@dataclass(frozen=True)
class Cell:
    row: Row
    mode: str
    split: int
    preset: str

    @property
    def name(self) -> str:
        return f"{self.row.name}-{self.mode}-{self.preset}-split{self.split}"


def cell_run_config(row: Row, mode: str, split: int, preset: str, extra: dict | None = None,
                    federated_extra: dict | None = None) -> dict:
    """A cell's run-config keys over pyproject.toml's defaults: the row's fusion and sensors, the preset, the split
    seed (the literal row: conf/paper.toml first, its model preset replaced by `preset`); then `extra` (every
    cell) and, for a federated cell, `federated_extra` (rounds, local epochs)."""
    rc = parse_run_config([str(PAPER_TOML)]) if row.literal else {}
    rc.update({"model-preset": preset, "fusion": row.fusion, "modalities": row.modalities, "split-seed": split})
    rc.update(extra or {})
    if mode == "federated":
        rc.update(federated_extra or {})
    return rc


# --------------------------------------------------------------------------- stored runs
def _same(key: str, a, b) -> bool:
    if key == "modalities":
        return {m for m in str(a).split(",") if m} == {m for m in str(b).split(",") if m}
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def settings_differ(res: dict, cell: Cell, wanted: dict, central_args: dict) -> dict:
    """What a stored run trained differently from `cell` with run config `wanted`: {key: [stored, wanted]}; empty
    when the settings are the same. Both configs are completed with today's defaults (`RunConfig`; a key the stored
    config lacks had its default then); keys of where and how fast a run ran (`IGNORED_KEYS`) and strategy tables
    (the cells run FedAvg, which has none) are not compared. A centralized run's own arguments (epochs, batch
    cap, monitor, ...) are compared too."""
    diff: dict = {}
    if res.get("mode") != cell.mode:
        diff["mode"] = [res.get("mode"), cell.mode]
    defaults = RunConfig().to_run_config()
    want = RunConfig.from_run_config(wanted).to_run_config()
    stored = res.get("config") or {}
    for k, v in want.items():
        if k in IGNORED_KEYS or "." in k:
            continue
        if k.startswith("dp-") and k != "dp-noise-multiplier" and not want.get("dp-noise-multiplier"):
            continue  # DP off: its other keys change nothing (a cell stored before dp-clip's default moved)
        have = stored.get(k, defaults.get(k))
        if not _same(k, have, v):
            diff[k] = [have, v]
    if cell.mode == "centralized":
        args = res.get("args") or {}
        have_epochs = (res.get("train_config") or {}).get("epochs", args.get("epochs"))
        for k, v in {"epochs": central_args["epochs"], "max_batches": central_args["max_batches"],
                     **CENTRAL_ARGS}.items():
            have = have_epochs if k == "epochs" else args.get(k, CENTRAL_ARGS.get(k))
            if have != v:
                diff[f"--{k.replace('_', '-')}"] = [have, v]
    return diff


def find_adoptable(cell: Cell, wanted: dict, central_args: dict, sources: list[Path]) -> Path | None:
    """A finished run under one of `sources` (their sub-folders) with exactly `cell`'s settings."""
    for src in sources:
        if not src.is_dir():
            continue
        for d in sorted(src.iterdir()):
            if not d.is_dir() or not (d / "results.json").exists():
                continue
            res = finished(d)
            if res is not None and not settings_differ(res, cell, wanted, central_args):
                return d
    return None


def adopt(src: Path, dst: Path) -> dict:
    """Copy finished run `src` in as cell `dst` (without its round checkpoints); results.json records the source."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint"))
    log = src.parent / f"{src.name}.log"
    if log.exists():
        shutil.copy2(log, dst.parent / f"{dst.name}.log")
    res = read_results(dst / "results.json")
    res["adopted_from"] = str(src)
    write_results(dst / "results.json", res)
    return res


# --------------------------------------------------------------------------- training
def _toml(v) -> str:
    return json.dumps(v)  # str, int, float, bool: the same text in TOML


def _kv(rc: dict) -> str:
    return " ".join(f"{k}={_toml(v)}" for k, v in rc.items())


def shown_keys(rc: dict) -> dict:
    """The keys of a run config that differ from the defaults (what a user types)."""
    defaults = RunConfig().to_run_config()
    return {k: v for k, v in rc.items() if k not in ("data-path",) and not _same(k, defaults.get(k), v)}


def reproduce_command(cell: Cell, rc: dict, central_args: dict) -> str:
    """The command that trains `cell` by hand."""
    if cell.mode == "federated":
        keys = shown_keys(rc)
        return f"python -m server_app.simulation --nodes {NODES}" + (f" --run-config {shlex.quote(_kv(keys))}"
                                                                     if keys else "")
    cmd = "python -m model.train"
    if cell.row.literal:
        base = parse_run_config([str(PAPER_TOML)])
        defaults = RunConfig().to_run_config()
        rest = {k: v for k, v in rc.items() if k != "data-path" and not _same(k, base.get(k, defaults.get(k)), v)}
        cmd += " --run-config conf/paper.toml" + (f" --run-config {shlex.quote(_kv(rest))}" if rest else "")
    else:
        keys = shown_keys(rc)
        cmd += f" --run-config {shlex.quote(_kv(keys))}" if keys else ""
    if central_args["epochs"] != CENTRAL_EPOCHS:
        cmd += f" --epochs {central_args['epochs']}"
    if central_args["max_batches"]:
        cmd += f" --max-batches {central_args['max_batches']}"
    return cmd


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def train_centralized(out: Path, cell: Cell, rc: dict, central_args: dict, timeout: float) -> dict:
    """`python -m model.train` for `cell` (its log: `<workdir>/<cell>.log`); raises with the log's end on failure."""
    run_dir = out / cell.name
    if run_dir.exists():  # an earlier attempt that did not finish: centralized runs keep no checkpoint
        print(f"    {cell.name}: an earlier attempt was interrupted; a centralized run cannot resume, training it "
              f"again from epoch 1", flush=True)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "model.train", "--output-dir", str(out), "--run-name", cell.name,
           "--run-config", _kv(rc), "--epochs", str(central_args["epochs"])]
    if central_args["max_batches"]:
        cmd += ["--max-batches", str(central_args["max_batches"])]
    log_path = out / f"{cell.name}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd[1:])}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout or None)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {timeout:.0f} s (--timeout); log: {log_path}\n"
                               f"{_tail(log_path)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"python -m model.train exited {proc.returncode}; log: {log_path}\n{_tail(log_path)}")
    res = finished(run_dir)
    if res is None:
        raise RuntimeError(f"finished without test figures: {run_dir / 'results.json'}\n{_tail(log_path)}")
    res["wall_s"] = round(time.time() - t0, 1)
    write_results(run_dir / "results.json", res)
    return res


def train_federated(out: Path, cell: Cell, rc: dict, timeout: float, cpus: float, gpus: float) -> dict:
    """The Ray simulation of `cell` (bench/_cells.py: resumes an interrupted attempt from its checkpoint)."""
    return federated_cell(out, cell.name, rc, timeout=timeout, cpus_per_client=cpus, gpus_per_client=gpus)


# --------------------------------------------------------------------------- summaries
def summarise(res: dict) -> dict:
    test = res.get("test") or {}
    federated = res.get("mode") == "federated"
    wall = (res.get("sim_wall_s") if federated else res.get("wall_s")) or res.get("wall_time_s")
    return {"weighted_f1": test.get("weighted_f1"), "macro_f1": test.get("macro_f1"),
            "accuracy": test.get("accuracy"), "wall_s": wall, "adopted_from": res.get("adopted_from"),
            "status": res.get("status")}


def _minutes(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.mean(xs) / 60:.1f}" if xs else "—"


def _paper(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


DIFFERENCES_COMMON = [
    "**Model size.** Unless the page says `paper` preset, our cells use the `compact` preset, built for a laptop "
    "CPU: the same architecture with about 40 times fewer parameters than the paper's model, trained from scratch "
    "with lr 1e-3 (the preset's own; the paper's 1e-4 learns too slowly at that size) — docs/model.md, Presets.",
    "**Early stopping.** Ours keeps the round / epoch of the highest validation weighted F1 (patience 6); the "
    "paper's reference code kept the worst federated round (its selection was inverted) — docs/model.md, "
    "Deviations.",
    "**Normalisation.** Each subject is z-scored by its own statistics (`normalization = \"subject\"`) and the "
    "accelerometer encoders also read each window's posture statistics (`acc-window-stats`); the paper z-scores "
    "every window by its own mean and std (`\"per_window\"`), which removes posture and gravity from the "
    "accelerometers — docs/data.md, README history.",
    "**BatchNorm at test time.** Each test subject's BatchNorm statistics are re-estimated on its own unlabeled "
    "windows (AdaBN, `eval-bn-stats = \"subject\"`), as clients train; centralized training then draws each batch "
    "from one subject — docs/federated.md, docs/model.md.",
    "**Aggregation.** FedAvg here is the sample-weighted mean of the clients' states; the paper's reference code "
    "took the plain (unweighted) mean — docs/federated.md, README history.",
    "**Smaller differences.** Noise only on training batches; class weights from each client's own labels; "
    "resampling on time (the depth camera runs at ~10.4 Hz, irregularly); the 48-window optimizer batch in one "
    "forward pass (`micro-batch = 0`); the frozen T5 base is rebuilt from a seed, not averaged — docs/model.md, "
    "README history.",
    "**Splits.** Split seed 42 is the paper's 21 / 3 / 6 subject split; seeds 1 and 2 are further splits of ours. "
    "The paper reports weighted F1 only; macro F1 is ours.",
]
DIFFERENCES_T1 = [
    "**Baselines.** `concat` concatenates the four embeddings, `attention` pools them with additive attention, "
    "`lstm` replaces the encoders by per-modality LSTMs on the raw per-step inputs, `dart` is DART-CNN on the "
    "depth camera and pressure mat only; all feed the same hierarchical classifier — docs/model.md, Baselines.",
    "**The literal row** uses conf/paper.toml (lr 1e-4, micro-batch 8, per-window z-scores, global BatchNorm "
    "statistics, no window statistics), on the page's model preset; what the reference code gets wrong is not "
    "copied there either (early stopping keeps the best epoch, noise on training batches only) — conf/paper.toml.",
]
DIFFERENCES_T2 = [
    "**Three sensors.** The left-out sensor is not in the model at all (`modalities`: no encoder is built for it), "
    "in training and at test alike; nothing else changes from the MAGNET row — docs/model.md, Missing modalities.",
    "**The thigh accelerometer (act) matters more here** (a hypothesis, not measured): our recipe keeps each "
    "window's posture and gravity direction in the accelerometers (per-subject z-scores, `acc-window-stats`), and "
    "the thigh's orientation to gravity alone tells many of MEx's seven mat exercises apart (they differ in body "
    "position); the paper's "
    "per-window z-scores remove it, which would make act less decisive there and the other sensors more. Running "
    "the three-sensor rows with conf/paper.toml would test this.",
]


def what_the_numbers_say(trs: list[Row], means: dict[tuple[str, str], float]) -> list[str]:
    """Bullets comparing our figures with the paper's (`means[(row, mode)]`: our test weighted F1): the
    offset per mode, whether the rows rank as the paper's do, the centralized → federated gap, and, with the
    literal row stored, what our recipe adds. Empty when fewer than two rows of the table are stored."""
    out: list[str] = []
    plain = [r for r in trs if not r.literal]
    for i, mode in enumerate(MODES):
        have = [r for r in plain if (r.name, mode) in means and r.paper[i] is not None]
        if len(have) < 2:
            continue
        diffs = [means[(r.name, mode)] - r.paper[i] for r in have]
        ours = sorted(have, key=lambda r: -means[(r.name, mode)])
        theirs = sorted(have, key=lambda r: -r.paper[i])
        same = ours == theirs
        rank = " > ".join(f"{r.label.split(' (')[0]} {means[(r.name, mode)]:.3f}" for r in ours)
        out.append(f"**{mode.capitalize()}, {len(have)} rows stored:** ours minus the paper "
                   f"{min(diffs):+.3f} to {max(diffs):+.3f} (mean {statistics.mean(diffs):+.3f}); our order {rank}"
                   + (" — the paper's order." if same else
                      " — the paper's is " + " > ".join(r.label.split(" (")[0] for r in theirs) + "."))
    both = [r for r in plain if all((r.name, m) in means for m in MODES) and None not in r.paper]
    if both:
        gaps = [(r, means[(r.name, "centralized")] - means[(r.name, "federated")], r.paper[0] - r.paper[1])
                for r in both]
        out.append("**Centralized minus federated:** " + "; ".join(
            f"{r.label.split(' (')[0]} {g:+.3f} (paper {pg:+.3f})" for r, g, pg in gaps) + ".")
    subsets = [r for r in plain if r.modalities != ALL]
    for i, mode in enumerate(MODES):
        full = ROWS["magnet"]
        have = [r for r in subsets if (r.name, mode) in means and r.paper[i] is not None]
        if not have or ("magnet", mode) not in means:
            continue
        left_out = {r: next(m for m in ALL.split(",") if m not in r.modalities.split(",")) for r in have}
        out.append(f"**{mode.capitalize()}, leaving one sensor out** (against all four: ours "
                   f"{means[('magnet', mode)]:.3f}, paper {full.paper[i]:.3f}): " + "; ".join(
                       f"without {left_out[r]} {means[(r.name, mode)] - means[('magnet', mode)]:+.3f} "
                       f"(paper {r.paper[i] - full.paper[i]:+.3f})" for r in have) + ".")
    lit = next((r for r in trs if r.literal), None)
    if lit is not None and (lit.name, "centralized") in means and ("magnet", "centralized") in means:
        a, b = means[("magnet", "centralized")], means[(lit.name, "centralized")]
        out.append(f"**Our recipe against the paper's literal settings** (centralized MAGNET, same model preset): "
                   f"{a:.3f} against {b:.3f} ({a - b:+.3f}); the paper reports {lit.paper[0]:.3f} with its "
                   "full-size model.")
    return out


def write_report(path: Path, rows: list[Row], cells: list[Cell], stored: dict[str, dict], failures: dict,
                 commands: dict[str, str], *, preset: str, workdir: str, tsne: dict | None,
                 figure: Path | None) -> str:
    """The markdown page (returned and written to `path`)."""
    def rel(p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(path.parent.resolve()))
        except ValueError:
            return str(p)

    by: dict[tuple[str, str], list[tuple[Cell, dict | None]]] = {}
    for c in cells:
        by.setdefault((c.row.name, c.mode), []).append((c, stored.get(c.name)))
    n_done = sum(1 for c in cells if c.name in stored)
    lines = [
        "# The paper's Tables 1 and 2, reproduced side by side",
        "",
        "What this page is for: the MHARFedLLM paper's Tables 1 and 2 (test weighted F1 of Time-MAGNET and of the "
        "other fusions, and of MAGNET on three of the four sensors, centralized and federated) beside the same rows "
        "trained with this code, with the command behind every figure and how our setup differs from the paper's. "
        f"Generated by `python bench/paper_tables.py` from the cells stored under `{workdir}` (edit the generator, "
        "not this page).",
        "",
        f"Stored: {n_done} of the {len(cells)} cells of the grid; a cell not stored (yet) shows \"—\". "
        f"Model preset: `{preset}`. Test: the six test subjects of each split, weighted and macro F1 over their "
        "windows; mean ± std over split seeds where a row has more than one (n = number of seeds). Federated: "
        f"the `flwr run` Ray simulation, {NODES} SuperNodes (one per training subject), 9 per round, 10 rounds × 5 "
        f"local epochs; centralized: `python -m model.train`, up to {CENTRAL_EPOCHS} epochs with early stopping. "
        "Everything else is pyproject.toml's recipe. Wall time: minutes per cell on the machine that trained it "
        "(the project's 2-core CPU unless noted).",
        "",
    ]
    if failures:
        lines += [f"Failed cells ({len(failures)}): " + ", ".join(f"`{n}`" for n in sorted(failures))
                  + f" — their errors are in `{workdir}/failures.json`; rerun the same command to try them again.",
                  ""]

    def cell_figs(row: Row, mode: str) -> tuple[str, str, str, str]:
        entries = by.get((row.name, mode), [])
        got = [s for _, s in entries if s is not None]
        failed = sum(1 for c, s in entries if s is None and c.name in failures)
        note = f" ({failed} failed)" if failed else ""
        if not entries:
            return "—", "—", "—", "—"
        return (mean_std([s["weighted_f1"] for s in got]) + note, mean_std([s["macro_f1"] for s in got]),
                str(len(got)) if got else "0", _minutes([s["wall_s"] for s in got]))

    for table, title, extra in ((1, "Table 1: fusion methods, all four sensors", DIFFERENCES_T1),
                                (2, "Table 2: MAGNET on three of the four sensors", DIFFERENCES_T2)):
        trs = [r for r in rows if r.table == table]
        if not trs:
            continue
        lines += [f"## {title}", "",
                  "| row | paper centralized wF1 | ours centralized wF1 | ours centralized macro F1 | n "
                  "| paper federated wF1 | ours federated wF1 | ours federated macro F1 | n "
                  "| wall time per cell, min (centralized / federated) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in trs:
            cw, cm, cn, ct = cell_figs(r, "centralized")
            fw, fm, fn, ft = cell_figs(r, "federated")
            label = r.label if not r.literal else f"{r.label}, `{preset}` model"
            lines.append(f"| {label} (`{r.name}`) | {_paper(r.paper[0])} | {cw} | {cm} | {cn} | "
                         f"{_paper(r.paper[1])} | {fw} | {fm} | {fn} | {ct} / {ft} |")
        at42 = {(r.name, m): s["weighted_f1"] for r in rows for m in MODES
                for c, s in by.get((r.name, m), []) if s is not None and c.split == 42}
        said = what_the_numbers_say(trs, at42)
        if said:
            lines += ["", "What the numbers say (test weighted F1 on split 42, the paper's split; generated from the "
                      "stored cells):", "", *[f"* {x}" for x in said]]
        lines += ["", "Where we differ from the paper and why:", ""]
        if table == 1 or not any(r.table == 1 for r in rows):
            lines += [f"* {d}" for d in (*DIFFERENCES_COMMON, *extra)]
        else:
            lines += ["* Every difference listed under Table 1 (model size, early stopping, normalisation, BatchNorm "
                      "at test time, aggregation, the smaller ones, splits) holds here too.",
                      *[f"* {d}" for d in extra]]
        lines += ["", "These are differences of setup, documented in the files named; apart from the literal row "
                  "(the paper's settings all at once), which of them moves which figure has not been measured here.",
                  ""]
        lines += ["Cells of this table (one per mode and split seed) and the commands that reproduce them:", "",
                  "| cell | test wF1 | test macro F1 | wall time, min | reproduce |", "|---|---|---|---|---|"]
        order = {r.name: i for i, r in enumerate(rows)}
        for c in sorted((c for c in cells if c.row.table == table),
                        key=lambda c: (order.get(c.row.name, 99), MODES.index(c.mode), c.split != 42, c.split)):
            s = stored.get(c.name)
            if s is not None:
                src = f" (adopted from `{_display(Path(s['adopted_from']))}`)" if s.get("adopted_from") else ""
                lines.append(f"| `{c.name}`{src} | {s['weighted_f1']:.3f} | {s['macro_f1']:.3f} | "
                             f"{_minutes([s['wall_s']])} | `{commands[c.name]}` |")
            else:
                state = "failed (failures.json)" if c.name in failures else "—"
                lines.append(f"| `{c.name}` | {state} | — | — | `{commands[c.name]}` |")
        lines.append("")
        lines += ["The whole table at once: `python bench/paper_tables.py --rows table" + str(table) + "`"
                  + (" (add `--paper-literal` for the literal row)" if table == 1 else "")
                  + "; `python bench/paper_tables.py --report-only` rebuilds this page from the stored cells.", ""]

    if figure is not None:
        lines += ["## Ours beside the paper", "", f"![ours beside the paper, per row]({rel(figure)})", "",
                  "Bars: mean test weighted F1 (ours: dots are split seeds); hatched: the paper's.", ""]

    lines += ["## Fused embeddings of the test windows (the paper's Figure 3)", ""]
    if tsne and tsne.get("png"):
        picture = Path(tsne["copy"]) if tsne.get("copy") else Path(tsne["png"])
        lines += [f"![t-SNE of the fused test embeddings]({rel(picture)})",
                  "",
                  f"The best stored federated MAGNET cell on all four sensors, `{tsne['cell']}` (test weighted F1 "
                  f"{tsne['cell_weighted_f1']:.3f}): the classifier's input (the fusion's output, "
                  f"{tsne['feature_dim']} numbers) for each of its {tsne['windows']} test windows, projected by "
                  f"t-SNE (scikit-learn, perplexity {tsne['perplexity']:g}, seed {tsne['seed']}), coloured by "
                  f"exercise. BatchNorm statistics: `{tsne['bn_stats']}` (as the run was tested); the same forward "
                  f"passes score weighted F1 {tsne['weighted_f1']:.3f}"
                  + (f"; silhouette of the fused embeddings by exercise {tsne['silhouette']:.3f}"
                     if tsne.get("silhouette") is not None else "")
                  + f". Also in `{_display(Path(tsne['png']))}`; rebuilt by "
                  "`python bench/paper_tables.py --report-only`.", ""]
    elif tsne and tsne.get("error"):
        lines += [f"Not drawn: {tsne['error']}", ""]
    else:
        lines += ["Not drawn: no federated MAGNET cell on all four sensors with its `best_model.safetensors` is "
                  "stored yet.", ""]

    lines += ["## GPU", ""]
    if preset == "paper":
        lines += ["The tables above are the `paper` preset (the full-size model).", ""]
    else:
        lines += ["The `paper` preset (the paper's full-size model) on a GPU: not measured: no GPU was available. "
                  "On one: `python bench/paper_tables.py --preset paper --workdir outputs/paper-tables-gpu "
                  "--gpus-per-client 0.25 --report-to docs/results-gpu.md` (docs/gpu.md: how the federation shares "
                  "a GPU).", ""]
    text = "\n".join(lines).rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def plot_rows(path: Path, rows: list[Row], cells: list[Cell], stored: dict[str, dict]) -> Path | None:
    """Bars of the paper's and our test weighted F1 per row, centralized and federated side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.25 * len(rows) + 2), 4.2))
    width = 0.2
    colors = {"centralized": "tab:blue", "federated": "tab:orange"}
    for i, r in enumerate(rows):
        for j, mode in enumerate(MODES):
            paper = r.paper[j]
            x0 = i + (j - 0.5) * 2 * width
            if paper is not None:
                ax.bar(x0 - width / 2, paper, width, color=colors[mode], alpha=0.35, hatch="//", edgecolor="grey")
            f1 = [stored[c.name]["weighted_f1"] for c in cells
                  if c.row is r and c.mode == mode and c.name in stored]
            if f1:
                ax.bar(x0 + width / 2, statistics.mean(f1), width, color=colors[mode],
                       yerr=statistics.stdev(f1) if len(f1) > 1 else 0, capsize=2)
                ax.plot([x0 + width / 2] * len(f1), f1, "k.", ms=3)
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test weighted F1")
    lowest = min([0.5] + [stored[c.name]["weighted_f1"] for c in cells if c.name in stored])
    ax.set_ylim(max(0.0, lowest - 0.05) if lowest < 0.5 else 0.5, 1.0)
    ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", alpha=0.35, hatch="//", label="paper, centralized"),
                       Patch(color="tab:blue", label="ours, centralized"),
                       Patch(color="tab:orange", alpha=0.35, hatch="//", label="paper, federated"),
                       Patch(color="tab:orange", label="ours, federated")], fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tsne_of_best(out: Path, preset: str, figures: Path, data_path: str | None, force: bool) -> dict | None:
    """The t-SNE of the best stored federated MAGNET cell on all four sensors at `preset` (highest test weighted F1
    among the finished ones with a checkpoint, any split seed), redrawn only when missing or older than its
    checkpoint; copied to `figures/tsne_best_federated_magnet.png`."""
    candidates = []
    for d in sorted(out.glob(f"magnet-federated-{preset}-split*")):
        res = finished(d)
        if res is not None and (d / "best_model.safetensors").exists():
            candidates.append((res["test"]["weighted_f1"], d.name))
    if not candidates:
        return None
    f1, name = max(candidates)
    run_dir = out / name
    png = run_dir / "plots" / "tsne_test.png"
    summary_path = png.with_suffix(".json")
    ckpt = run_dir / "best_model.safetensors"
    try:
        if force or not summary_path.exists() or summary_path.stat().st_mtime < ckpt.stat().st_mtime:
            from _embeddings import plot_tsne

            print(f"t-SNE of the fused test embeddings of {name} ...", flush=True)
            summary = plot_tsne(run_dir, png, data_path=data_path, title=f"{name} (federated MAGNET)")
        else:
            summary = json.loads(summary_path.read_text())
    except Exception as e:  # noqa: BLE001 — the report is still written, saying why there is no picture
        return {"error": f"t-SNE of `{name}` failed: {type(e).__name__}: {e}"}
    figures.mkdir(parents=True, exist_ok=True)
    copy = figures / "tsne_best_federated_magnet.png"
    shutil.copy2(png, copy)
    return {**summary, "png": str(png), "copy": str(copy), "cell": name, "cell_weighted_f1": f1}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a script: SIGTERM stops a running simulation cleanly (not when a test calls main)
        from server_app.simulation import exit_on_sigterm

        exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"comma-separated rows ({', '.join(DEFAULT_ROWS)}; table1, table2 = all of a table); "
                        "default: both tables")
    p.add_argument("--modes", default="centralized,federated")
    p.add_argument("--split-seeds", default="",
                   help="split seeds of every row (default: 42, and 42,1,2 for the MAGNET all-sensor row)")
    p.add_argument("--all-seeds", action="store_true", help="every row on split seeds 42,1,2")
    p.add_argument("--preset", default="compact", help="model preset of every cell (paper: the full-size model)")
    p.add_argument("--paper-literal", action="store_true",
                   help="add the centralized MAGNET row with conf/paper.toml's settings (on --preset's model)")
    p.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "paper-tables")
    p.add_argument("--report-to", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the tables, figures and t-SNE from the stored cells")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one cell may run (a federated cell "
                                                               "stopped by it resumes next time)")
    p.add_argument("--max-cells", type=int, default=0, help="> 0: train at most this many cells, then report")
    p.add_argument("--adopt-from", default=str(ROOT / "outputs" / "bench-headline"),
                   help="comma-separated folders whose finished runs with exactly a cell's settings are copied in "
                        "as that cell ('' = none)")
    p.add_argument("--data-path", default="")
    p.add_argument("--run-config", default="",
                   help="extra run-config keys for every cell (key=value, TOML values); they are part of the "
                        "cells' settings, so a workdir holds one such choice")
    p.add_argument("--rounds", type=int, default=0, help="federated cells: num-server-rounds (default: pyproject's)")
    p.add_argument("--local-epochs", type=int, default=0, help="federated cells: local-epochs (default: pyproject's)")
    p.add_argument("--epochs", type=int, default=CENTRAL_EPOCHS, help="centralized cells: --epochs")
    p.add_argument("--max-batches", type=int, default=0, help="centralized cells: batches per epoch (smoke runs)")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE picture")
    p.add_argument("--tsne-force", action="store_true", help="redraw the t-SNE even when it is up to date")
    a = p.parse_args(argv)

    rows = parse_rows(a.rows, a.paper_literal)
    modes = [m for m in a.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    explicit = [int(s) for s in a.split_seeds.split(",") if s.strip()]
    extra = parse_run_config([a.run_config]) if a.run_config else {}
    if a.data_path:
        extra["data-path"] = str(Path(a.data_path).resolve())
    fed_extra = {**({"num-server-rounds": a.rounds} if a.rounds else {}),
                 **({"local-epochs": a.local_epochs} if a.local_epochs else {})}
    central_args = {"epochs": a.epochs, "max_batches": a.max_batches or None, **CENTRAL_ARGS}
    out = a.workdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sources = [Path(s).resolve() for s in a.adopt_from.split(",") if s.strip()]

    def seeds_of(r: Row, asked: bool = True) -> list[int]:
        if explicit and asked:
            return explicit
        if (a.all_seeds and asked) or r.name == "magnet":
            return list(MAGNET_SEEDS)
        return [42]

    def grid(rows_: list[Row], asked: bool) -> list[Cell]:
        """Seed by seed: the first pass fills every row at split 42, the extra seeds come after."""
        out_cells: list[Cell] = []
        depth = max(len(seeds_of(r, asked)) for r in rows_)
        for k in range(depth):
            for r in rows_:
                seeds = seeds_of(r, asked)
                if k >= len(seeds):
                    continue
                for mode in (modes if asked else MODES):
                    if r.literal and mode == "federated":
                        continue  # the literal row is centralized
                    out_cells.append(Cell(r, mode, seeds[k], a.preset))
        return out_cells

    cells = grid(rows, asked=True)  # what this invocation trains
    # what the report shows: both tables in full (the default grid), the cells asked for, and every other stored
    # cell of a row at this preset (more split seeds, the literal row)
    literal_stored = any(out.glob(f"magnet-paper-literal-centralized-{a.preset}-split*/results.json"))
    report_rows = [ROWS[n] for n in DEFAULT_ROWS] + (
        [ROWS["magnet-paper-literal"]] if a.paper_literal or literal_stored or ROWS["magnet-paper-literal"] in rows
        else [])
    report_cells = list(dict.fromkeys(grid(report_rows, asked=False) + cells + discover(out, a.preset)))
    rcs = {c.name: cell_run_config(c.row, c.mode, c.split, c.preset, extra, fed_extra) for c in report_cells}
    commands = {c.name: reproduce_command(c, rcs[c.name], central_args) for c in report_cells}
    asked = {c.name for c in cells}

    failures_path = out / "failures.json"
    failures: dict = json.loads(failures_path.read_text()) if failures_path.exists() else {}

    def save_failures() -> None:
        write_json(failures_path, failures)

    stored: dict[str, dict] = {}
    todo: list[Cell] = []
    for c in report_cells:  # what is there already: finished, adoptable, or to train
        res = finished(out / c.name)
        if res is not None:
            diff = settings_differ(res, c, rcs[c.name], central_args)
            if diff:
                if c.name in asked:
                    failures[c.name] = {"error": f"the stored cell has other settings than asked: {diff}; move "
                                                 f"{out / c.name} away (or use another --workdir) to train it again",
                                        "at": time.strftime("%Y-%m-%d %H:%M:%S")}
                continue
            stored[c.name] = summarise(res)
            failures.pop(c.name, None)
            continue
        if not (out / c.name).exists() and sources:
            src = find_adoptable(c, rcs[c.name], central_args, sources)
            if src is not None:
                stored[c.name] = summarise(adopt(src, out / c.name))
                print(f"    {c.name}: adopted {src} (the same settings)", flush=True)
                failures.pop(c.name, None)
                continue
        if c.name in asked:
            todo.append(c)

    trained_s: list[float] = []
    limit = a.max_cells if a.max_cells > 0 else len(todo)
    n = len(cells)
    for i, c in enumerate(cells, 1):
        stamp = f"[{time.strftime('%H:%M:%S')}] ({i}/{n}) {c.name}:"
        if c.name in stored:
            s = stored[c.name]
            how = "adopted" if s.get("adopted_from") else "reused"
            print(f"{stamp} {how}, finished (test wF1 {s['weighted_f1']:.3f})", flush=True)
            continue
        if c not in todo:
            print(f"{stamp} skipped: {failures[c.name]['error']}", flush=True)
            continue
        if a.report_only or len(trained_s) >= limit:
            print(f"{stamp} not stored" + (" (--report-only)" if a.report_only
                                           else f" (--max-cells {a.max_cells} reached)"), flush=True)
            continue
        left = min(limit, len(todo)) - len(trained_s)  # this cell and those after it in this invocation
        past = trained_s or [s["wall_s"] for s in stored.values() if s.get("wall_s")]
        eta = (f"ETA {statistics.mean(past) * left / 60:.0f} min for {left} cell(s)" if past
               else f"{left} cell(s) to train, no finished cell to time yet")
        print(f"{stamp} training {c.mode} ({eta})", flush=True)
        t0 = time.time()
        try:
            if c.mode == "federated":
                res = train_federated(out, c, dict(rcs[c.name]), a.timeout, a.cpus_per_client, a.gpus_per_client)
            else:
                res = train_centralized(out, c, rcs[c.name], central_args, a.timeout)
        except Exception as e:  # noqa: BLE001 — recorded, and the grid goes on
            trained_s.append(time.time() - t0)
            failures[c.name] = {"error": f"{type(e).__name__}: {e}"[-4000:],
                                "at": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(trained_s[-1], 1)}
            save_failures()
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"    {c.name}: FAILED after {trained_s[-1]:.0f} s (recorded in {failures_path}): {first}",
                  flush=True)
            continue
        trained_s.append(time.time() - t0)
        stored[c.name] = summarise(res)
        failures.pop(c.name, None)
        save_failures()
        print(f"    {c.name}: test wF1 {stored[c.name]['weighted_f1']:.3f} in {trained_s[-1] / 60:.1f} min",
              flush=True)
    save_failures()

    # the report
    report = a.report_to.resolve()
    figures = report.parent / "figures"
    tsne = None if a.no_tsne else tsne_of_best(out, a.preset, figures, extra.get("data-path"), a.tsne_force)
    figure = plot_rows(figures / "paper_tables.png", report_rows, report_cells, stored) if stored else None
    shown_failures = {k: v for k, v in failures.items() if k in rcs}
    text = write_report(report, report_rows, report_cells, stored, shown_failures, commands, preset=a.preset,
                        workdir=_display(out), tsne=tsne, figure=figure)
    print()
    print("\n".join(ln for ln in main_tables(text)))
    print(f"\nreport: {report}")
    print(json.dumps({"workdir": str(out), "report": str(report), "preset": a.preset,
                      "cells": [{"cell": c.name, "row": c.row.name, "mode": c.mode, "split": c.split,
                                 **({k: stored[c.name][k] for k in ("weighted_f1", "macro_f1", "wall_s",
                                                                    "adopted_from")} if c.name in stored
                                    else {"missing": True, "failed": c.name in failures})} for c in report_cells],
                      "trained": len(trained_s), "failures": sorted(shown_failures), "tsne": tsne}))
    return 0


def discover(out: Path, preset: str) -> list[Cell]:
    """Stored cells of any row at `preset` under `out` (e.g. split seeds beyond the default grid)."""
    found = []
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        m = re.fullmatch(rf"(.+)-(centralized|federated)-{re.escape(preset)}-split(\d+)", d.name)
        if m and m.group(1) in ROWS and (d / "results.json").exists():
            found.append(Cell(ROWS[m.group(1)], m.group(2), int(m.group(3)), preset))
    return found


def main_tables(text: str) -> list[str]:
    """The report's two summary tables (for the terminal)."""
    keep, on = [], False
    for ln in text.splitlines():
        if ln.startswith("## Table"):
            on = True
            keep += ["", ln]
        elif ln.startswith("Where we differ"):
            on = False
        elif on and ln.startswith("|"):
            keep.append(ln)
    return keep


def _display(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    sys.exit(main())

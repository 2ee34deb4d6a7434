"""One optimizer step of the compact preset (48 windows, forward + backward + AdamW, one thread) three ways, side
by side: eager fp32 (the default), CPU bf16 autocast (the CPU has AMX), and `torch.compile` of the whole model.
Why: the throughput issue's second attempt at >= 3x one client's training speed (docs/performance.md).

    python bench/step_variants.py                  # all three; compiling takes minutes on 2 cores
    python bench/step_variants.py --variants eager,bf16

Steps alternate between the variants (this machine is noisy); prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model import build_model  # noqa: E402
from model.config import MODALITIES  # noqa: E402


def synthetic_batches(cfg, n: int, batch: int, seed: int = 0) -> list[dict]:
    from model.config import FRAME_SHAPES

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {m: torch.randn(batch, cfg.acc_steps, 3, generator=g) for m in ("act", "acw")}
        b.update({m: torch.randn(batch, cfg.frame_steps, *FRAME_SHAPES[m], generator=g) for m in ("dc", "pm")})
        b["mask"] = torch.ones(batch, len(MODALITIES), dtype=torch.bool)
        b["y"] = torch.randint(0, 7, (batch,), generator=g)
        out.append(b)
    return out


def step_fn(model: torch.nn.Module, run: torch.nn.Module, bf16: bool):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, aux = run(batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["y"]) + 0.01 * aux.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="eager,bf16,compile")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = build_model("compact", "magnet", MODALITIES, seed=0, ts_window_stats=True).train()
    data = synthetic_batches(base.cfg, 4, args.batch)
    steps, setup_s = {}, {}
    for name in args.variants.split(","):
        model = copy.deepcopy(base).train()
        run = torch.compile(model) if name == "compile" else model
        steps[name] = step_fn(model, run, bf16=name == "bf16")
        t0 = time.perf_counter()
        for b in data[:2]:
            steps[name](b)  # warm-up (compiling happens here)
        setup_s[name] = time.perf_counter() - t0
        print(f"{name}: warm-up {setup_s[name]:.1f} s", flush=True)
    times = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for b in data:
                step(b)
            times[name].append((time.perf_counter() - t0) / len(data))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"\n{'variant':10} {'warm-up s':>10} {'step ms':>9} {'windows/s':>10} {'vs eager':>9}")
    for k in steps:
        print(f"{k:10} {setup_s[k]:10.1f} {1000 * med[k]:9.1f} {args.batch / med[k]:10.0f} "
              f"{med.get('eager', med[k]) / med[k]:8.2f}x")
    out = {"batch": args.batch, "step_ms": {k: round(1000 * v, 1) for k, v in med.items()},
           "warmup_s": {k: round(v, 1) for k, v in setup_s.items()},
           "speedup_vs_eager": {k: round(med["eager"] / v, 3) for k, v in med.items()} if "eager" in med else {}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

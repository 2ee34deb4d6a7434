"""Training and inference throughput (windows/s) of each model preset on this machine's CPU or GPU.

Training = the real loop (``model.fit``: forward, backward, AdamW with 8x6 accumulation, clipping)
on synthetic batches of the preset's input shapes; inference = ``model.training.predict``.
Prints a readable table, then one JSON line (the last line) with every figure.

    python bench/model.py                      # tiny, compact, paper; 1 and 2 threads
    python bench/model.py --presets compact --threads 1 --batches 60
    python bench/model.py --device cuda --threads 4 --presets paper --paper-batches 12 --batch-size 8,32 --amp off,bf16,fp16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model import TrainConfig, build_model, count_parameters, fit, state_nbytes, trainable_state  # noqa: E402
from model.config import FRAME_SHAPES, MODALITIES  # noqa: E402
from model.training import predict  # noqa: E402


def synthetic_batches(cfg, n: int, batch_size: int, num_classes: int = 7, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {m: torch.randn(batch_size, cfg.acc_steps, 3, generator=g) for m in ("act", "acw")}
        for m in ("dc", "pm"):
            b[m] = torch.randn(batch_size, cfg.frame_steps, *FRAME_SHAPES[m], generator=g)
        b["mask"] = torch.ones(batch_size, len(MODALITIES), dtype=torch.bool)
        b["y"] = torch.randint(0, num_classes, (batch_size,), generator=g)
        out.append(b)
    return out


def measure(preset: str, fusion: str, modalities: str, threads: int, batches: int, batch_size: int, repeats: int,
            device: str = "cpu", amp: str = "off", **overrides) -> dict:
    torch.set_num_threads(threads)
    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    model = build_model(preset, fusion, modalities, seed=0, **overrides)
    cfg = model.cfg
    data = synthetic_batches(cfg, batches, batch_size)
    warm = data[: max(1, min(len(data) // 2, 6))]
    tc = TrainConfig(epochs=1, grad_accum=6, amp=amp)
    fit(model, warm, tc, device=device, log=None)  # warm-up (allocator, oneDNN primitives / cuDNN autotune)
    predict(model, warm, device, amp=amp)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    train_rates, infer_rates, train_cpu = [], [], []
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        sync()
        t, c = time.perf_counter(), time.process_time()
        fit(model, data, tc, device=device, log=None)
        sync()
        train_rates.append(batches * batch_size / (time.perf_counter() - t))
        train_cpu.append((time.process_time() - c) * 1000 / (batches * batch_size))
        t = time.perf_counter()
        predict(model, data, device, amp=amp)
        sync()
        infer_rates.append(batches * batch_size / (time.perf_counter() - t))
    pc = count_parameters(model)
    full = {k: v for k, v in model.state_dict().items()}
    return {
        "preset": preset,
        "fusion": fusion,
        "device": device,
        "amp": amp,
        "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
        "threads": threads,
        "batch_size": batch_size,
        "batches": batches,
        "acc_steps": cfg.acc_steps,
        "frame_steps": cfg.frame_steps,
        "params_total": pc["total"],
        "params_trainable": pc["trainable"],
        "bytes_trainable_state": state_nbytes(trainable_state(model)),
        "bytes_full_state": state_nbytes({k: v.clone() for k, v in full.items()}),
        "train_windows_per_s": max(train_rates),
        "train_ms_per_window": 1000.0 / max(train_rates),
        "infer_windows_per_s": max(infer_rates),
        "infer_ms_per_window": 1000.0 / max(infer_rates),
        "train_windows_per_s_all": train_rates,
        "train_cpu_ms_per_window": min(train_cpu),  # process CPU time (all threads): robust to time-slicing
        "loadavg_1min_before": load_before,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,compact,paper")
    ap.add_argument("--fusion", default="magnet")
    ap.add_argument("--modalities", default=",".join(MODALITIES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", type=int, default=48, help="training batches per measurement")
    ap.add_argument("--paper-batches", type=int, default=2, help="training batches for the paper preset")
    ap.add_argument("--batch-size", default="8", help="one or more, comma-separated")
    ap.add_argument("--repeats", type=int, default=2, help="best of N (shared machine)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--amp", default="off", help="off | auto | fp16 | bf16, or several comma-separated (CUDA only)")
    args = ap.parse_args()

    rows = []
    for preset in args.presets.split(","):
        for th, bs, amp in itertools.product([int(t) for t in args.threads.split(",")],
                                             [int(b) for b in args.batch_size.split(",")], args.amp.split(",")):
            n = args.paper_batches if preset == "paper" else args.batches
            rep = 1 if preset == "paper" else args.repeats
            r = measure(preset, args.fusion, args.modalities, th, n, bs, rep, args.device, amp)
            rows.append(r)
            print(
                f"{preset:8s} {args.fusion:8s} {args.device}/{amp} batch {bs} thr={th} T_acc={r['acc_steps']:<4d} T_frame={r['frame_steps']:<3d} "
                f"params {r['params_total']/1e6:8.3f}M (trainable {r['params_trainable']/1e6:8.3f}M)  "
                f"train {r['train_windows_per_s']:8.1f} win/s ({r['train_ms_per_window']:7.2f} ms)  "
                f"infer {r['infer_windows_per_s']:8.1f} win/s ({r['infer_ms_per_window']:6.2f} ms)  "
                f"[train CPU {r['train_cpu_ms_per_window']:.2f} ms/win, load {r['loadavg_1min_before']:.1f}]",
                flush=True,
            )
    print()
    hdr = "| preset | device | batch | threads | train win/s | ms/win | train CPU ms/win | infer win/s | ms/win | trainable bytes | full bytes | load |"
    print(hdr)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['device']} {r['amp']} | {r['batch_size']} | {r['threads']} | {r['train_windows_per_s']:.1f} | {r['train_ms_per_window']:.2f} | "
            f"{r['train_cpu_ms_per_window']:.2f} | {r['infer_windows_per_s']:.1f} | {r['infer_ms_per_window']:.2f} | "
            f"{r['bytes_trainable_state']:,} | {r['bytes_full_state']:,} | {r['loadavg_1min_before']:.1f} |"
        )
    print(json.dumps({
        "bench": "model",
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "results": rows,
    }))


if __name__ == "__main__":
    main()

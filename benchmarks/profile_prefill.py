"""Where a VISOR prefill spends its time: torch.profiler over one prefill at a bench shape.

    python benchmarks/profile_prefill.py 0.5b visor:2 [visual_tokens] [device] [prefill mode]

Prints the wall-clock of the prefill, the number of kernels launched and the operators by their
device time, so a reader sees whether a phase is bound by compute or by launching kernels.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from visor.bench import BenchConfig, build, parse_methods, prompt
from visor.generate import Prefill


@torch.no_grad()
def main() -> None:
    size, method = sys.argv[1], sys.argv[2]
    n_visual = int(sys.argv[3]) if len(sys.argv) > 3 else 7290
    device = torch.device(sys.argv[4] if len(sys.argv) > 4 else "cuda")
    mode = sys.argv[5] if len(sys.argv) > 5 else "eager"  # visor.generate.PREFILL_MODES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = BenchConfig(size=size, visual_tokens=n_visual, text_tokens=64, methods=method)
    _, lm = build(cfg, device, dtype)
    ((_, budget),) = parse_methods(method, lm.schedule)
    tok = prompt(lm, cfg, device, dtype)
    prefill = Prefill(lm, budget, 96, mode)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        prefill(tok)
    sync()
    began = time.perf_counter()
    for _ in range(10):
        prefill(tok)
    sync()
    print(f"{size} {method} {mode}: prefill {1e3 * (time.perf_counter() - began) / 10:.2f} ms (mean of 10)")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        prefill(tok)
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=18, max_name_column_width=60))
    print("aten ops called:", sum(e.count for e in events if e.key.startswith("aten::")))


if __name__ == "__main__":
    main()

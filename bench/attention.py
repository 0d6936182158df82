"""Benchmark 3×3 neighbourhood attention: time and extra peak memory of each implementation on the CPU.

Every (config, variant) is measured in two fresh subprocesses with 2 threads:
- time: median of a few calls after warm-ups, with the default glibc malloc (what a user gets);
- memory: with ``MALLOC_MMAP_THRESHOLD_=131072`` so that every allocation of 128 KiB or more is returned to the
  OS on free and RSS follows live tensors. Extra peak = Linux VmHWM during one call (reset through
  /proc/self/clear_refs) minus RSS before it, inputs already allocated; the minimum over two calls after a
  warm-up, so one-off lazy initialisation is not counted. Gradients returned by backward count towards the
  fwd+bwd peak. Page faults make this run slower, so its times are not used.

    .venv/bin/python bench/attention.py [--quick] [--compile] [--batch 16] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

CONFIGS: dict[str, dict[str, int]] = {
    "geca-s": {"heads": 12, "head_dim": 64, "grid": 32},  # D=768 at 32×32 latents
    "cpu": {"heads": 4, "head_dim": 32, "grid": 28},  # a model that trains on this CPU, 28×28 pixels
}
# "cpu" (the C kernels) here includes packing q, k, v into one tensor, which a model's qkv projection gives for free
# (bench/train_step.py times it inside the model).
EAGER_VARIANTS = ("reference", "fast", "sliced", "cpu")
COMPILED = "compiled"  # model.compile's attention: `sliced` under torch.compile
MODES = ("time", "memory")
WARMUPS, REPEATS = 1, 3  # enough on a quiet machine; keeps the full run to a few minutes


def _times_ms(step: Callable[[], None], name: str) -> dict[str, float]:
    """Median and minimum wall time; the minimum is the less disturbed by other processes on a shared machine."""
    for _ in range(WARMUPS):
        step()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return {f"{name}_ms": statistics.median(times), f"{name}_min_ms": min(times)}


def _extra_peak_mib(step: Callable[[], None]) -> float:
    import torch
    from common import peak_memory, reset_peak_memory

    step()
    peaks = []
    for _ in range(2):
        base = reset_peak_memory(torch.device("cpu"))  # VmHWM restarts from the current RSS
        step()
        peaks.append(peak_memory(torch.device("cpu")) - base)
    return min(peaks)


def worker(config: str, variant: str, mode: str, batch: int) -> dict[str, float]:
    """Measure one variant on one config in this process: times or peak memory."""
    import torch

    from geca.models.attention import neighbourhood_attention

    torch.set_num_threads(2)
    shape = (batch, CONFIGS[config]["heads"], CONFIGS[config]["grid"], CONFIGS[config]["grid"])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, CONFIGS[config]["head_dim"], generator=gen).requires_grad_() for _ in "qkv")
    grad = torch.randn(q.shape, generator=gen)
    attend = functools.partial(neighbourhood_attention, impl=variant)

    def fwd_bwd() -> None:
        torch.autograd.grad(attend(q, k, v), (q, k, v), grad)

    def fwd() -> None:
        with torch.no_grad():
            attend(q, k, v)

    if mode == "time":
        return _times_ms(fwd_bwd, "fwd_bwd") | _times_ms(fwd, "fwd")
    return {"fwd_bwd_peak_mib": _extra_peak_mib(fwd_bwd), "fwd_peak_mib": _extra_peak_mib(fwd)}


def _run_worker(config: str, variant: str, mode: str, args: argparse.Namespace) -> dict[str, float]:
    spec = {"config": config, "variant": variant, "mode": mode, "batch": args.batch}
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{config}/{variant} ({mode}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def _ratios(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Speed-ups (reference time / variant time) and memory ratios (variant peak / reference peak)."""
    ref = results["reference"]
    return {
        variant: {
            "speedup_fwd_bwd": ref["fwd_bwd_ms"] / r["fwd_bwd_ms"],
            "speedup_fwd": ref["fwd_ms"] / r["fwd_ms"],
            "memory_ratio_fwd_bwd": r["fwd_bwd_peak_mib"] / ref["fwd_bwd_peak_mib"],
            "memory_ratio_fwd": r["fwd_peak_mib"] / ref["fwd_peak_mib"],
        }
        for variant, r in results.items()
    }


def _print_table(report: dict, to_stderr: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"3×3 neighbourhood attention, CPU, 2 threads, batch {report['batch']}")
    for column in ("config", "variant", "fwd+bwd ms", "speed-up", "fwd+bwd peak MiB", "mem ratio"):
        table.add_column(column, justify="left" if column in ("config", "variant") else "right")
    for column in ("fwd ms", "speed-up", "fwd peak MiB", "mem ratio"):
        table.add_column(column, justify="right")
    for config, entry in report["configs"].items():
        label = "{} {}×{}, {}×{}".format(config, *entry["grid"], entry["heads"], entry["head_dim"])
        for variant, r in entry["variants"].items():
            x = entry["vs_reference"][variant]
            table.add_row(
                label,
                variant,
                f"{r['fwd_bwd_ms']:.0f}",
                f"{x['speedup_fwd_bwd']:.1f}×",
                f"{r['fwd_bwd_peak_mib']:.0f}",
                f"{x['memory_ratio_fwd_bwd']:.2f}",
                f"{r['fwd_ms']:.0f}",
                f"{x['speedup_fwd']:.1f}×",
                f"{r['fwd_peak_mib']:.0f}",
                f"{x['memory_ratio_fwd']:.2f}",
            )
            label = ""
    table.caption = (
        f"1-min load average before the run: {report['load_average_before']:.1f} (well above 0: other processes "
        "competed for the 2 cores, and 2-thread timings of many small ops suffer badly)"
    )
    Console(stderr=to_stderr, width=150).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 16, 4 with --quick)")
    parser.add_argument("--quick", action="store_true", help="batch 4 instead of 16")
    parser.add_argument("--compile", action="store_true",
                        help="also time 'compiled' (model.compile's attention: 'sliced' under torch.compile)")
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=tuple(CONFIGS))
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout (table on stderr)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be ≥ 1, got {args.batch}")
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    if args.batch is None:
        args.batch = 4 if args.quick else 16
    variants = EAGER_VARIANTS + ((COMPILED,) if args.compile else ())

    report: dict = {"batch": args.batch, "threads": 2, "warmups": WARMUPS, "repeats": REPEATS}
    report |= {"load_average_before": os.getloadavg()[0], "configs": {}}
    for config in args.configs:
        results = {}
        for variant in variants:
            print(f"{config} / {variant} ...", file=sys.stderr, flush=True)
            results[variant] = {k: v for mode in MODES for k, v in _run_worker(config, variant, mode, args).items()}
        report["configs"][config] = {**CONFIGS[config], "grid": [CONFIGS[config]["grid"]] * 2}
        report["configs"][config] |= {"variants": results, "vs_reference": _ratios(results)}
    _print_table(report, to_stderr=args.json)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark glibc's allocator as it comes against the one `geca` sets (freed memory kept, see
`geca.utils.allocator`): sampling and training throughput, minor page faults and kernel time, each in a fresh
process (the setting is process-wide), on the RetinaMNIST CPU shape by default.

    .venv/bin/python bench/allocator.py [--configs GeCA-T,DiT-T,LDM-T] [--batch 100] [--train-batch 32]
                                        [--resolution 28] [--channels 3] [--classes 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from common import device_of, model_config, model_parser, positive
from sample import sampling_seconds
from train_step import step_time

from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.models.build import build_model
from geca.sampling.config import SamplerConfig


def _counted(fn: Callable[[], float], calls: int) -> dict[str, float]:
    """What `fn` returns (seconds per unit), with minor page faults per call and the kernel's share of wall time;
    `fn` makes `calls` calls of the measured work."""
    start, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    seconds = fn()
    end, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {"seconds": seconds, "minor_faults": (end.ru_minflt - start.ru_minflt) / calls,
            "kernel_fraction": (end.ru_stime - start.ru_stime) / max(wall, 1e-9)}


def child(args: argparse.Namespace) -> list[dict]:
    device = device_of(args)
    shape = (args.channels, args.resolution, args.resolution)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    rows = []
    for name in args.configs.split(","):
        torch.manual_seed(0)
        model = build_model(model_config(name, args), args.channels, args.classes, args.resolution).to(device).eval()
        sc = SamplerConfig(sampler="ddim", steps=args.steps, ghg="hidden" if model.has_cell_state else "none",
                           clip_x0=True)
        sampling_seconds(model, diffusion, sc, args.batch, shape, args.classes, device)  # warm-up
        s = _counted(lambda: sampling_seconds(model, diffusion, sc, args.batch, shape, args.classes, device), 1)  # noqa: B023
        rows.append({"config": name, "work": "sample", "ms_per_image_step": 1e3 * s["seconds"] / args.batch
                     / args.steps, "minor_faults": s["minor_faults"], "kernel_fraction": s["kernel_fraction"]})
        attention = "fast" if model.has_cell_state else "-"
        # step_time runs one untimed step, then `repeats` timed ones, and returns their median.
        s = _counted(lambda: step_time(model_config(name, args), attention, "fp32", args.train_batch,  # noqa: B023
                                       args.channels, args.resolution, args.classes, args.repeats, device)[0],
                     args.repeats + 1)
        rows.append({"config": name, "work": "train", "ms_per_image_step": 1e3 * s["seconds"] / args.train_batch,
                     "minor_faults": s["minor_faults"], "kernel_fraction": s["kernel_fraction"]})
    return rows


def main() -> None:
    ap = model_parser(__doc__, 100, "Images sampled together (CFG doubles the denoiser batch).")
    ap.set_defaults(resolution=28, channels=3, classes=5)
    ap.add_argument("--train-batch", type=positive, default=32, help="Training batch.")
    ap.add_argument("--steps", type=positive, default=3, help="DDIM steps per timed sampling call.")
    ap.add_argument("--repeats", type=positive, default=3, help="Timed calls per setting (median reported).")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"rows": child(args)}))
        return
    passed = [a for a in sys.argv[1:] if a != "--json"]
    results = {}
    for malloc in ("default", "tuned"):
        out = subprocess.run([sys.executable, __file__, *passed, "--malloc", malloc, "--child"], check=True,
                             capture_output=True, text=True).stdout
        results[malloc] = json.loads(out.strip().splitlines()[-1])["rows"]
        if not args.json:
            print(f"measured glibc {malloc}", flush=True)
    rows = []
    for d, t in zip(results["default"], results["tuned"], strict=True):
        rows.append({"config": d["config"], "work": d["work"],
                     "default_ms_per_image_step": round(d["ms_per_image_step"], 2),
                     "tuned_ms_per_image_step": round(t["ms_per_image_step"], 2),
                     "speedup": round(d["ms_per_image_step"] / t["ms_per_image_step"], 2),
                     "default_minor_faults": int(d["minor_faults"]), "tuned_minor_faults": int(t["minor_faults"]),
                     "default_kernel_fraction": round(d["kernel_fraction"], 2),
                     "tuned_kernel_fraction": round(t["kernel_fraction"], 2)})
    result = {"batch": args.batch, "train_batch": args.train_batch, "steps": args.steps,
              "input": [args.channels, args.resolution, args.resolution], "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    if not args.json:
        print(f"\n{'config':8s} {'work':6s} {'default ms':>10s} {'tuned ms':>9s} {'×':>5s} {'faults def':>11s} "
              f"{'faults tuned':>12s} {'kernel def':>10s} {'kernel tuned':>12s}")
        for r in rows:
            print(f"{r['config']:8s} {r['work']:6s} {r['default_ms_per_image_step']:10.2f} "
                  f"{r['tuned_ms_per_image_step']:9.2f} {r['speedup']:5.2f} {r['default_minor_faults']:11,d} "
                  f"{r['tuned_minor_faults']:12,d} {r['default_kernel_fraction']:10.0%} "
                  f"{r['tuned_kernel_fraction']:12.0%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

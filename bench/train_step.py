"""Benchmark one training step (forward + backward + AdamW) for named configs of every family, in one table.

Training images/s per config and precision, each setting in a fresh process (no setting inherits another's allocator
pools, caches or threads), one run, so the ratios compare like with like. For GeCA configs the reference neighbourhood
attention (the published 9×-copy gather) is measured beside `fast` and, on a CPU, the C kernels (`cpu`, what the default
`auto` runs there) or, on CUDA, the Triton kernels; a variant ending in `:dense` computes every cell's update, as
published, where the default computes only the updates of the cells that fire; `compiled` is model.compile: the
attention compiled where idle cells are skipped, the whole NCA step with `compiled:dense`; `cpu+compile` wraps the whole
model in torch.compile with the C kernels inside its graph, as a user's own compile does, and `fast+graphs:dense` in its
CUDA-graph mode (reduce-overhead: a small model's launches replayed as one graph; on a CPU plain torch.compile). DiT and
the UNet have no such choice (their rows show attention "-"). `--set KEY=VALUE` changes a model setting (a 1 M GeCA:
--set hidden_size=208 --set heads=4 --set mlp_hidden=832). Each row also has the peak memory of the steps (the first
included: activations, gradients, AdamW's state) above what was held before them (CUDA: `max_memory_allocated`; CPU:
Linux VmHWM, the process's resident set), and the model-FLOP utilisation: 6 × the forward MACs the variant executes on
the batch (forward + backward ≈ 3 forwards; attention's score and value products not counted) per second, over the
matmul throughput measured in this run.

    .venv/bin/python bench/train_step.py [--configs GeCA-T,DiT-T,LDM-T] [--batch 8] [--resolution 32]
                                         [--channels 4] [--classes 11] [--precisions fp32,bf16] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
from common import (
    DTYPES,
    device_of,
    failed,
    fresh_process,
    matmul_peak_tflops,
    model_config,
    model_parser,
    peak_memory,
    positive,
    precisions,
    reset_peak_memory,
    worker_error,
)

from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.models.attention import IMPLEMENTATIONS
from geca.models.build import build_model, count_macs, count_parameters
from geca.models.config import ModelConfig, named_model

NO_CHOICE = "-"


WRAPS = {"compile": "default", "graphs": "reduce-overhead"}  # torch.compile modes; reduce-overhead: CUDA graphs


def variant_config(config: ModelConfig, variant: str) -> tuple[ModelConfig, bool, str | None]:
    """`config` with a GeCA variant `ATTENTION[+compile|+graphs][:dense]` applied, whether model.compile is on, and
    the torch.compile mode the whole model is wrapped in as a user would (`cpu+compile`: the C kernels inside the
    graph; `+graphs`: replayed as CUDA graphs, which skips the launches of a small model), or None."""
    if variant == NO_CHOICE:
        return config, False, None
    attention, _, update = variant.partition(":")
    attention, plus, wrap = attention.partition("+")
    if update not in ("", "dense") or (plus and wrap not in WRAPS):
        raise SystemExit(f"error: --attention: unknown variant {variant!r} (ATTENTION[+compile|+graphs][:dense])")
    # "compiled" is model.compile: its attention (sliced under torch.compile) where idle cells are skipped, the
    # whole NCA step with ":dense".
    config.attention = "fast" if attention == "compiled" else attention
    config.skip_idle = update != "dense"
    return config, attention == "compiled", WRAPS[wrap] if plus else None


def step_time(config: ModelConfig, variant: str, precision: str, batch: int, channels: int, resolution: int,
              classes: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per step and the extra peak memory (MiB) of the timed steps."""
    config, compile, wrap = variant_config(config, variant)
    torch.manual_seed(0)
    model = build_model(config, channels, classes, resolution, compile).to(device)
    call = torch.compile(model, mode=wrap) if wrap else model
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as geca train
    x = torch.randn(batch, channels, resolution, resolution, device=device)
    y = torch.eye(classes, device=device)[torch.randint(0, classes, (batch,))]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        if wrap == "reduce-overhead":  # a new step: the graphs' outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = diffusion.training_losses(lambda xt, tt: call(xt, tt, y).output, x, t, torch.randn_like(x))
        loss["loss"].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    held = reset_peak_memory(device)  # before the first step: it allocates the gradients and AdamW's state
    timed()
    seconds = statistics.median(timed() for _ in range(repeats))
    return seconds, peak_memory(device) - held


def main() -> None:
    ap = model_parser(__doc__, 8, "Batch size per step.")
    ap.add_argument("--attention", help="GeCA variants to compare, ATTENTION or ATTENTION:dense (every cell's update "
                    "computed, as published); ATTENTION is fast, sliced, reference, triton or compiled (model.compile: "
                    "its attention, or with :dense the whole NCA step) or cpu (the C kernels); ATTENTION+compile "
                    "wraps the whole model in torch.compile as a user would, ATTENTION+graphs in its CUDA-graph "
                    "mode (reduce-overhead; with :dense, as skipping idle cells syncs with the host) (default: "
                    "cpu,cpu:dense,"
                    "compiled,fast,fast:dense,reference:dense; on CUDA compiled,compiled:dense,fast,fast:dense,triton,"
                    "reference:dense).")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 and/or fp16 (fp16: GPU only).")
    ap.add_argument("--repeats", type=positive, default=3, help="Timed steps per setting (median reported).")
    ap.add_argument("--worker", nargs=3, metavar=("CONFIG", "ATTENTION", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = device_of(args)
    args.precisions = ",".join(precisions(ap, args.precisions, device))
    args.attention = args.attention or ("compiled,compiled:dense,fast,fast:dense,triton,reference:dense"
                                        if device.type == "cuda" else
                                        "cpu,cpu:dense,compiled,fast,fast:dense,reference:dense")
    for variant in args.attention.split(","):  # before the matmul peak is measured
        try:
            attention = variant_config(named_model("GeCA-T"), variant)[0].attention
        except SystemExit as e:
            ap.error(str(e).removeprefix("error: "))
        if attention not in (*IMPLEMENTATIONS, "auto"):
            ap.error(f"--attention: unknown attention {attention!r} in {variant!r}; valid: "
                     f"{', '.join(IMPLEMENTATIONS)} or auto")
    if args.worker:
        name, variant, precision = args.worker
        print(json.dumps(step_time(model_config(name, args), variant, precision, args.batch, args.channels,
                                   args.resolution, args.classes, args.repeats, device)))
        return
    peaks = {p: matmul_peak_tflops(device, DTYPES[p]) for p in args.precisions.split(",")}
    rows = []
    for name in args.configs.split(","):
        try:
            config = model_config(name, args)
            attentions = args.attention.split(",") if config.family == "geca" else [NO_CHOICE]
            flops = {}
            for attention in attentions:
                # The same maths compiled or not: counting need not compile.
                counted, _, _ = variant_config(model_config(name, args), attention)
                model = build_model(counted, args.channels, args.classes, args.resolution)
                params = count_parameters(model)
                macs = count_macs(model, args.channels, args.classes, args.resolution, executed=True)
                flops[attention] = 6 * macs * args.batch
        except Exception as e:
            failed(rows, f"{name:8s} cannot be built here:", f"{type(e).__name__}: {e}", config=name)
            continue
        for precision in args.precisions.split(","):
            base = None
            for attention in attentions:
                try:
                    s, mib = fresh_process(__file__, [name, attention, precision])
                except subprocess.CalledProcessError as e:
                    failed(rows, f"{name:8s} {precision:5s} {attention:16s} failed:", worker_error(e), config=name,
                           precision=precision, attention=attention)
                    continue
                row = {"config": name, "family": config.family, "parameters": params, "precision": precision,
                       "attention": attention, "seconds_per_step": round(s, 4),
                       "images_per_s": round(args.batch / s, 2), "peak_mib": round(mib, 1),
                       "model_tflops": round(flops[attention] / s / 1e12, 4),
                       "mfu": round(flops[attention] / s / 1e12 / peaks[precision], 4)}
                if attention.startswith("reference"):
                    base = row
                rows.append(row)
                if not args.json:
                    print(f"{name:8s} {precision:5s} {attention:16s} {s:8.3f} s/step {args.batch / s:8.2f} img/s "
                          f"{mib:8.1f} MiB  MFU {row['mfu']:.1%}", flush=True)
            if base is not None:
                for row in rows:
                    if row["config"] == name and row["precision"] == precision and "error" not in row:
                        row["speedup_vs_reference"] = round(base["seconds_per_step"] / row["seconds_per_step"], 2)
                        row["memory_vs_reference"] = round(row["peak_mib"] / max(base["peak_mib"], 1e-9), 2)
    result = {"set": args.set, "batch": args.batch, "input": [args.channels, args.resolution, args.resolution],
              "classes": args.classes, "threads": args.threads, "device": str(device),
              "matmul_peak_tflops": {p: round(v, 4) for p, v in peaks.items()},
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{'config':8s} {'family':6s} {'params':>11s} {'prec':5s} {'attention':16s} {'img/s':>9s} {'× ref':>6s} "
          f"{'peak MiB':>9s} {'mem × ref':>9s} {'MFU':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:8s} {'':6s} {'':11s} {r.get('precision', ''):5s} {r.get('attention', ''):16s} "
                  f"failed: {r['error']}")
            continue
        ref = f"{r['speedup_vs_reference']:6.2f}" if "speedup_vs_reference" in r else f"{'':6s}"
        mem = f"{r['memory_vs_reference']:9.2f}" if "memory_vs_reference" in r else f"{'':9s}"
        print(f"{r['config']:8s} {r['family']:6s} {r['parameters']:11,d} {r['precision']:5s} {r['attention']:16s} "
              f"{r['images_per_s']:9.2f} {ref} {r['peak_mib']:9.1f} {mem} {r['mfu']:6.1%}")
    print("matmul peak measured now (TFLOP/s): " + ", ".join(f"{p} {v:.3f}" for p, v in peaks.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Benchmark one training step (forward + backward + AdamW) for named configs of every family, in one table.

Training images/s per config and precision, measured in one process so the ratios compare like with like. For
GeCA configs the reference neighbourhood attention (the published 9×-copy gather) is measured beside the fast
default; DiT and the UNet have no such choice (their rows show attention "-").

    .venv/bin/python bench/train_step.py [--configs GeCA-T,DiT-T,LDM-T] [--batch 8] [--resolution 32]
                                         [--channels 4] [--classes 11] [--precisions fp32,bf16] [--device cpu] [--json]
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch
from common import device_of, model_parser

from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.models.build import build_model, count_parameters
from geca.models.config import named_model

NO_CHOICE = "-"


def step_time(name: str, attention: str, precision: str, batch: int, channels: int, resolution: int,
              classes: int, repeats: int, device: torch.device) -> float:
    config = named_model(name)
    if attention != NO_CHOICE:
        config.attention = attention
    torch.manual_seed(0)
    model = build_model(config, channels, classes, resolution).to(device)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, resolution, resolution, device=device)
    y = torch.eye(classes, device=device)[torch.randint(0, classes, (batch,))]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, y).output, x, t, torch.randn_like(x))
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

    timed()
    return statistics.median(timed() for _ in range(repeats))


def main() -> None:
    ap = model_parser(__doc__, 8, "Batch size per step.")
    ap.add_argument("--attention", default="fast,reference", help="GeCA attention implementations to compare.")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 and/or fp16 (fp16: GPU only).")
    ap.add_argument("--repeats", type=int, default=3, help="Timed steps per setting (median reported).")
    args = ap.parse_args()
    device = device_of(args)
    rows = []
    for name in args.configs.split(","):
        config = named_model(name)
        params = count_parameters(build_model(config, args.channels, args.classes, args.resolution))
        attentions = args.attention.split(",") if config.family == "geca" else [NO_CHOICE]
        for precision in args.precisions.split(","):
            base = None
            for attention in attentions:
                s = step_time(name, attention, precision, args.batch, args.channels, args.resolution,
                              args.classes, args.repeats, device)
                row = {"config": name, "family": config.family, "parameters": params, "precision": precision,
                       "attention": attention, "seconds_per_step": round(s, 4),
                       "images_per_s": round(args.batch / s, 2)}
                if attention == "reference":
                    base = row
                rows.append(row)
                if not args.json:
                    print(f"{name:8s} {precision:5s} {attention:10s} {s:8.3f} s/step {args.batch / s:8.2f} img/s",
                          flush=True)
            if base is not None:
                for row in rows:
                    if row["config"] == name and row["precision"] == precision:
                        row["speedup_vs_reference"] = round(base["seconds_per_step"] / row["seconds_per_step"], 2)
    result = {"batch": args.batch, "input": [args.channels, args.resolution, args.resolution],
              "classes": args.classes, "threads": args.threads, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{'config':8s} {'family':6s} {'params':>11s} {'prec':5s} {'attention':10s} {'img/s':>9s} {'× ref':>6s}")
    for r in rows:
        ref = f"{r['speedup_vs_reference']:6.2f}" if "speedup_vs_reference" in r else f"{'':6s}"
        print(f"{r['config']:8s} {r['family']:6s} {r['parameters']:11,d} {r['precision']:5s} {r['attention']:10s} "
              f"{r['images_per_s']:9.2f} {ref}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Benchmark one GeCA training step (forward + backward + AdamW) for each named config.

Images/s per config, precision and attention implementation, measured in one process so the ratios compare like
with like. The reference attention (the published 9×-copy gather) is measured beside the fast default.

    .venv/bin/python bench/train_step.py [--configs GeCA-T,GeCA-XS,GeCA-S] [--batch 8] [--resolution 32]
                                         [--channels 4] [--classes 11] [--precisions fp32,bf16] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from geca.diffusion import DiffusionConfig, GaussianDiffusion
from geca.models import build_model, count_parameters, named_model


def step_time(name: str, attention: str, precision: str, batch: int, channels: int, resolution: int,
              classes: int, repeats: int) -> float:
    cfg = named_model(name)
    cfg.attention = attention
    torch.manual_seed(0)
    model = build_model(cfg, channels, classes, resolution)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, resolution, resolution)
    y = torch.eye(classes)[torch.randint(0, classes, (batch,))]

    def step() -> None:
        t = torch.randint(0, 1000, (batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, y).output, x, t, torch.randn_like(x))
        loss["loss"].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="GeCA-T,GeCA-XS,GeCA-S", help="Comma-separated named configs.")
    ap.add_argument("--attention", default="fast,reference", help="Attention implementations to compare.")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (CPU autocast).")
    ap.add_argument("--batch", type=int, default=8, help="Batch size per step.")
    ap.add_argument("--resolution", type=int, default=32, help="Grid size (32 = SD-VAE latent of 256² images).")
    ap.add_argument("--channels", type=int, default=4, help="Input channels (4 = SD-VAE latents).")
    ap.add_argument("--classes", type=int, default=11, help="Label entries.")
    ap.add_argument("--repeats", type=int, default=3, help="Timed steps per setting (median reported).")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    ap.add_argument("--json", action="store_true", help="Print JSON only.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs.split(","):
        params = count_parameters(build_model(named_model(name), args.channels, args.classes, args.resolution))
        for precision in args.precisions.split(","):
            base = None
            for attention in args.attention.split(","):
                s = step_time(name, attention, precision, args.batch, args.channels, args.resolution,
                              args.classes, args.repeats)
                row = {"config": name, "parameters": params, "precision": precision, "attention": attention,
                       "seconds_per_step": round(s, 4), "images_per_s": round(args.batch / s, 2)}
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
              "classes": args.classes, "threads": args.threads, "device": "cpu", "machine": platform.processor()
              or platform.machine(), "torch": torch.__version__, "rows": rows}
    if not args.json:
        print(f"\n{'config':8s} {'prec':5s} {'attention':10s} {'img/s':>8s} {'× ref':>6s}")
        for r in rows:
            print(f"{r['config']:8s} {r['precision']:5s} {r['attention']:10s} {r['images_per_s']:8.2f} "
                  f"{r.get('speedup_vs_reference', float('nan')):6.2f}")
    print(json.dumps(result, indent=None if not args.json else 2))


if __name__ == "__main__":
    main()

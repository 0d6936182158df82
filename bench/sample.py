"""Benchmark sampling: seconds per image for named configs of every family, DDPM 250 and DDIM 50 steps.

Each setting samples one batch through `geca.sampling.samplers.sample` (the path `geca sample` takes) with
classifier-free guidance 1.5, so every step is one doubled-batch denoiser call; GeCA uses Gene Heredity Guidance
(hidden), the baselines none. Weights are freshly initialised (speed does not depend on them). GMACs per denoiser
call are counted on a batch of 1 (attention's score and value products not counted, as `geca models` does).

    .venv/bin/python bench/sample.py [--configs GeCA-T,DiT-T,LDM-T] [--batch 4] [--resolution 32] [--channels 4]
                                     [--classes 11] [--device cpu] [--quick] [--json]
"""

from __future__ import annotations

import json
import platform
import time

import torch
from common import device_of, model_parser

from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.models.build import build_model, count_parameters
from geca.models.config import count_macs, named_model
from geca.sampling.config import SamplerConfig
from geca.sampling.labels import per_class_labels
from geca.sampling.samplers import sample

SETTINGS = (("ddpm", 250), ("ddim", 50))


def sampling_seconds(model: torch.nn.Module, diffusion: GaussianDiffusion, sampler: SamplerConfig, batch: int,
                     shape: tuple[int, int, int], classes: int, device: torch.device) -> float:
    labels = per_class_labels(classes, batch // classes + 1)[:batch].to(device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sample(model, diffusion, labels, shape, sampler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    ap = model_parser(__doc__, 4, "Images sampled together.")
    ap.add_argument("--cfg", type=float, default=1.5, help="Classifier-free guidance scale.")
    ap.add_argument("--quick", action="store_true", help="Smoke run: 5 DDPM and 2 DDIM steps instead of 250/50.")
    args = ap.parse_args()
    device = device_of(args)
    shape = (args.channels, args.resolution, args.resolution)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    settings = (("ddpm", 5), ("ddim", 2)) if args.quick else SETTINGS
    rows = []
    for name in args.configs.split(","):
        config = named_model(name)
        torch.manual_seed(0)
        model = build_model(config, args.channels, args.classes, args.resolution).to(device).eval()
        gmacs = count_macs(model, args.channels, args.classes, args.resolution) / 1e9
        ghg = "hidden" if model.has_cell_state else "none"
        # One untimed step first, so that one-off setup (allocator, kernels) is not billed to the first setting.
        sampling_seconds(model, diffusion, SamplerConfig(steps=1, guidance_scale=args.cfg, ghg=ghg), args.batch, shape,
                         args.classes, device)
        for sampler, steps in settings:
            sc = SamplerConfig(sampler=sampler, steps=steps, guidance_scale=args.cfg, ghg=ghg)
            s = sampling_seconds(model, diffusion, sc, args.batch, shape, args.classes, device)
            calls = steps * (2 if args.cfg != 1.0 else 1)  # CFG: each step also runs the null label
            row = {"config": name, "family": config.family, "parameters": count_parameters(model),
                   "gmacs_per_call": round(gmacs, 3), "sampler": sampler, "steps": steps, "ghg": ghg,
                   "seconds_per_image": round(s / args.batch, 4),
                   "gmacs_per_image": round(gmacs * calls, 3)}
            rows.append(row)
            if not args.json:
                print(f"{name:8s} {sampler:4s} {steps:4d} steps {s / args.batch:9.3f} s/image", flush=True)
    result = {"batch": args.batch, "input": list(shape), "classes": args.classes, "cfg": args.cfg,
              "threads": args.threads, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{'config':8s} {'family':6s} {'params':>11s} {'GMAC/call':>9s} {'sampler':8s} {'s/image':>9s} "
          f"{'GMAC/image':>10s}")
    for r in rows:
        print(f"{r['config']:8s} {r['family']:6s} {r['parameters']:11,d} {r['gmacs_per_call']:9.3f} "
              f"{r['sampler'] + ' ' + str(r['steps']):8s} {r['seconds_per_image']:9.3f} {r['gmacs_per_image']:10.4g}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

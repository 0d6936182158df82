"""Benchmark sampling: cost per image of each sampler, and (with --run) what the fewer calls cost in quality.

Speed (default): named configs of every family with fresh weights (speed does not depend on them), each sampler
setting in a fresh process, one batch through `geca.sampling.samplers.sample` (the path `geca sample` takes) with
classifier-free guidance 1.5, so every step is one doubled-batch denoiser call; GeCA uses Gene Heredity Guidance
(hidden), the baselines none; `--precisions fp32,bf16` runs every setting in each (the denoiser calls under
autocast, as `geca sample --precision` does). Per setting: seconds per image, peak memory above what was held before
sampling (CUDA: `max_memory_allocated`; CPU: Linux VmHWM), GMACs per image (attention's score and value products not
counted, as `geca models` does), the model-FLOP utilisation against the matmul throughput measured in this run in
the row's precision, and its speed against fp32's.

Quality (--run RUN --real SPEC:SPLIT): the trained run samples the same labels with the same seed under every
setting (`geca sample` on --device, whose default here is cpu: give --device cuda on a GPU), then `geca evaluate`
scores all sets together (standard protocol; domain features unless --features says otherwise): KID (± its standard
error over generated sets) and class-faithfulness against denoiser calls (one call per step, its CFG halves batched
together, as the study's sampler-cost table counts them), each as a ratio to the first setting (DDPM 250); with
`--precisions` each setting is sampled in each precision.

    .venv/bin/python bench/sample.py [--configs GeCA-T,DiT-T,LDM-T] [--batch 4] [--resolution 32] [--channels 4]
                                     [--classes 11] [--precisions fp32,bf16] [--device cpu] [--quick] [--json]
    .venv/bin/python bench/sample.py --run runs/fundus --real synthetic-fundus:test --train synthetic-fundus:train
                                     --per-class 40 --out runs/fundus/sampler-bench [--settings ddpm:250,ddpm:25]
                                     [--checkpoint STEP --reuse] [--split-check] [--precisions fp32,bf16]
                                     [--device cuda]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

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
    precisions,
    reset_peak_memory,
    worker_error,
)

from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.models.build import build_model, count_macs, count_parameters
from geca.models.config import ModelConfig
from geca.sampling.config import SamplerConfig, default_schedule
from geca.sampling.labels import per_class_labels
from geca.sampling.samplers import sample

GECA = [sys.executable, "-m", "geca"]  # every quality setting runs through the command a user runs
SETTINGS = ("ddpm:250,ddim:50,ddim:25,ddpm:25,dpm++sde:25,dpm++sde:25:uniform,dpm++:25,dpm++:20,dpm++sde:20,dpm++:10,"
            "dpm++sde:10")
QUICK = "ddpm:5,ddim:2,dpm++:2,dpm++sde:2"
SETTING = ("config", "sampler", "steps", "schedule")  # what a row's fp32 twin shares with it


def parse_settings(text: str) -> list[tuple[str, int, str | None]]:
    """`SAMPLER:STEPS[:SCHEDULE],…` as (sampler, steps, schedule or None: the sampler's default), each checked as
    `geca sample` would."""
    settings = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit():
            raise ValueError(f"{item!r} is not SAMPLER:STEPS[:SCHEDULE]")
        sampler, steps, *rest = parts
        schedule = rest[0] if rest else None
        SamplerConfig(sampler=sampler, steps=int(steps), schedule=schedule).validate()
        settings.append((sampler, int(steps), schedule))
    return settings


def finished(directory: Path, args: argparse.Namespace, sampler: str, steps: int, schedule: str | None,
             precision: str) -> bool:
    """Whether `directory` already holds this setting's set from this run, checkpoint, seed and labels."""
    try:
        m = json.loads((directory / "manifest.json").read_text())
        same_checkpoint = (m["checkpoint_step"] == int(args.checkpoint) if args.checkpoint.isdigit()
                           else Path(m["checkpoint"]).resolve() == Path(args.checkpoint).resolve())
        return (Path(m["run"]).resolve() == Path(args.run).resolve() and m["seed"] == 0 and same_checkpoint
                and m["labels"] == f"per-class {args.per_class}"
                and (m["sampling"]["sampler"], m["sampling"]["steps"], m["sampling"]["guidance_scale"])
                == (sampler, steps, args.cfg)
                # Sets sampled before schedules and precisions existed were spaced evenly, in fp32.
                and m["sampling"].get("schedule", "uniform") == default_schedule(sampler, schedule)
                and m["sampling"].get("precision", "fp32") == precision)
    except (OSError, ValueError, KeyError, TypeError):  # no set there, or not one of ours (or not JSON, not UTF-8)
        return False


def sampling_cost(config: ModelConfig, sampler: str, steps: int, schedule: str, precision: str, cfg: float,
                  batch: int, shape: tuple[int, int, int], classes: int, device: torch.device) -> tuple[float, float]:
    """Seconds of sampling one batch, after an untimed two-step run of the same sampler (one-off set-up), and the
    peak memory (MiB) of both above what the model and inputs hold (the first run's allocations count: on a CPU
    the tuned allocator keeps them for the second)."""
    torch.manual_seed(0)
    model = build_model(config, shape[0], classes, shape[1]).to(device).eval()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    ghg = "hidden" if model.has_cell_state else "none"
    setting = SamplerConfig(sampler=sampler, steps=steps, guidance_scale=cfg, ghg=ghg, schedule=schedule, clip_x0=True,
                            precision=precision)
    # one image first: what the first call imports (diffusers' scheduler, the C kernels' torch.library glue, ~150 MiB
    # on a CPU) is not sampling's memory, and would count for some samplers only
    sampling_seconds(model, diffusion, replace(setting, steps=2), 1, shape, classes, device)
    held = reset_peak_memory(device)
    sampling_seconds(model, diffusion, replace(setting, steps=2), batch, shape, classes, device)
    return sampling_seconds(model, diffusion, setting, batch, shape, classes, device), peak_memory(device) - held


def sampling_seconds(model: torch.nn.Module, diffusion: GaussianDiffusion, setting: SamplerConfig, batch: int,
                     shape: tuple[int, int, int], classes: int, device: torch.device) -> float:
    """Seconds of one `sample` call of `batch` images, every class in turn (bench/allocator.py times it too)."""
    labels = per_class_labels(classes, batch // classes + 1)[:batch].to(device)
    start = time.perf_counter()
    sample(model, diffusion, labels, shape, setting)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def speed(args: argparse.Namespace, device: torch.device) -> dict:
    shape = (args.channels, args.resolution, args.resolution)
    peaks = {p: matmul_peak_tflops(device, DTYPES[p]) for p in args.precisions}
    rows = []
    for name in args.configs.split(","):
        try:
            config = model_config(name, args)
            model = build_model(config, args.channels, args.classes, args.resolution)
            gmacs = count_macs(model, args.channels, args.classes, args.resolution, executed=True) / 1e9
        except Exception as e:
            failed(rows, f"{name:8s} cannot be built here:", f"{type(e).__name__}: {e}", config=name)
            continue
        for (sampler, steps, schedule), precision in itertools.product(args.settings, args.precisions):
            schedule = default_schedule(sampler, schedule)
            try:
                s, mib = fresh_process(__file__, [name, sampler, str(steps), schedule, precision])
            except subprocess.CalledProcessError as e:
                failed(rows, f"{name:8s} {sampler:8s} {steps:4d} steps {precision:5s} failed:", worker_error(e),
                       config=name, sampler=sampler, steps=steps, schedule=schedule, precision=precision)
                continue
            calls = steps * (2 if args.cfg != 1.0 else 1)  # CFG: each step also runs the null label
            flops = 2 * gmacs * 1e9 * calls * args.batch
            row = {"config": name, "family": config.family, "parameters": count_parameters(model),
                   "gmacs_per_call": round(gmacs, 3), "sampler": sampler, "steps": steps, "schedule": schedule,
                   "precision": precision, "seconds_per_image": round(s / args.batch, 4),
                   "gmacs_per_image": round(gmacs * calls, 3), "peak_mib": round(mib, 1),
                   "mfu": round(flops / s / 1e12 / peaks[precision], 4)}
            rows.append(row)
            if not args.json:
                print(f"{name:8s} {sampler:8s} {steps:4d} steps {schedule:7s} {precision:5s} {s / args.batch:9.3f} "
                      f"s/image {mib:8.1f} MiB", flush=True)
    timed = [r for r in rows if "error" not in r]
    fp32 = {tuple(r[k] for k in SETTING): r["seconds_per_image"] for r in timed if r["precision"] == "fp32"}
    for r in timed:
        if (base := fp32.get(tuple(r[k] for k in SETTING))) is not None:
            r["speed_vs_fp32"] = round(base / max(r["seconds_per_image"], 1e-9), 2)
    return {"batch": args.batch, "input": list(shape), "classes": args.classes, "cfg": args.cfg,
            "matmul_peak_tflops": {p: round(v, 4) for p, v in peaks.items()}, "rows": rows}


def quality(args: argparse.Namespace) -> dict:
    """Every setting through the geca command itself, so the numbers are what a user gets."""
    out = Path(args.out)
    sets, reused = [], set()
    for (sampler, steps, schedule), precision in itertools.product(args.settings, args.precisions):
        name = SamplerConfig(sampler=sampler, steps=steps, schedule=schedule, precision=precision).label()
        sets.append(name)
        if args.reuse and finished(out / name, args, sampler, steps, schedule, precision):
            print(f"reusing {out / name}", flush=True)
            reused.add(name)
            continue
        chosen = ["--checkpoint", args.checkpoint] if args.checkpoint else []
        chosen += ["--schedule", schedule] if schedule else []
        subprocess.run([*GECA, "sample", "--run", args.run, *chosen, "--out", str(out / name), "--per-class",
                        str(args.per_class), "--sampler", sampler, "--steps", str(steps), "--cfg", str(args.cfg),
                        "--precision", precision, "--device", args.device, "--seed", "0", "--overwrite",
                        "--no-progress", "--threads", str(args.threads)], check=True)
    results = evaluate(args, {n: out / n for n in sets}, out / "metrics.json")
    rows = []
    for name in sets:
        manifest = json.loads((out / name / "manifest.json").read_text())
        sc, r = manifest["sampling"], results[name]
        faithful = r["faithfulness"]["value"]
        if faithful is None:
            raise SystemExit(f"{name}: class-faithfulness is undefined for these labels")
        rows.append({"setting": name, "calls": sc["steps"], "precision": sc.get("precision", "fp32"),
                     "seconds_per_image": round(manifest["seconds"] / manifest["num_images"], 4),
                     "kid": r["kid"]["mean"], "kid_std": r["kid"]["std"], "kid_se": r["kid"]["se"],
                     "faithfulness": faithful, "chance": r["faithfulness"]["chance"],
                     # A reused set's seconds are from the run that sampled it, whatever --threads says now.
                     "reused": name in reused})
    base = rows[0]
    for row in rows:
        row["calls_vs_first"] = round(base["calls"] / row["calls"], 2)
        row["kid_vs_first"] = round(row["kid"] / max(base["kid"], 1e-12), 3)
        row["faithfulness_vs_first"] = round(row["faithfulness"] / max(base["faithfulness"], 1e-12), 3)
    result = {"run": args.run, "checkpoint": args.checkpoint or "latest", "real": args.real,
              "per_class": args.per_class, "cfg": args.cfg, "rows": rows}
    if args.split_check:
        result["split_check"] = split_check(args, out, sets)
    return result


def evaluate(args: argparse.Namespace, sets: dict[str, Path], metrics: Path) -> dict[str, dict]:
    subprocess.run([*GECA, "evaluate", "--generated", *(f"{n}={d}" for n, d in sets.items()),
                    "--real", args.real, "--train", args.train, "--features", args.features, "--gg-features",
                    args.features, "--protocol", "standard", "--no-lpips", "--out", str(metrics), "--no-progress",
                    "--overwrite"],  # an earlier run's report (evaluate replaces nothing else)
                   check=True)
    return {r["name"]: r for r in json.loads(metrics.read_text())["results"]}


def split_check(args: argparse.Namespace, out: Path, sets: list[str]) -> dict:
    """Whether KID's standard error tells the truth here: each set split into two halves with the same labels
    (alternate images of each label), both halves scored; over the settings, the root-mean-square gap between
    halves against the one their standard errors predict (√(se_a² + se_b²))."""
    halves = {}
    for name in sets:
        with open(out / name / "labels.csv", newline="") as f:
            header, *rows = list(csv.reader(f))
        seen: dict[tuple[str, ...], int] = {}
        split: dict[str, list[list[str]]] = {"a": [], "b": []}
        for row in rows:
            key = tuple(row[1:])
            split["ab"[seen.setdefault(key, 0) % 2]].append(row)
            seen[key] += 1
        for half, chosen in split.items():
            directory = out / "split-check" / f"{name}-{half}"
            shutil.rmtree(directory, ignore_errors=True)
            (directory / "images").mkdir(parents=True)
            for row in chosen:
                shutil.copy(out / name / row[0], directory / row[0])
            with open(directory / "labels.csv", "w", newline="") as f:
                csv.writer(f).writerows([header, *chosen])
            halves[f"{name}-{half}"] = directory
    results = evaluate(args, halves, out / "split-check" / "metrics.json")
    gaps = [results[f"{n}-a"]["kid"]["mean"] - results[f"{n}-b"]["kid"]["mean"] for n in sets]
    predicted = [math.hypot(results[f"{n}-a"]["kid"]["se"], results[f"{n}-b"]["kid"]["se"]) for n in sets]
    return {"sets": len(sets), "rms_gap": math.sqrt(sum(g * g for g in gaps) / len(gaps)),
            "rms_predicted": math.sqrt(sum(p * p for p in predicted) / len(predicted)),
            "gaps": dict(zip(sets, gaps, strict=True)), "predicted": dict(zip(sets, predicted, strict=True))}


def main() -> None:
    ap = model_parser(__doc__, 4, "Images sampled together (speed).")
    ap.add_argument("--cfg", type=float, default=1.5, help="Classifier-free guidance scale.")
    ap.add_argument("--settings", help="SAMPLER:STEPS[:SCHEDULE],… to compare; the first is the reference (default "
                    f"{SETTINGS}; dpm++ and dpm++sde default to the lambda schedule).")
    ap.add_argument("--quick", action="store_true", help=f"Smoke run: {QUICK}.")
    ap.add_argument("--precisions", default="fp32", help="The denoiser calls' precisions, each setting in every one: "
                    "fp32, bf16 and/or fp16 (fp16: GPU only).")
    ap.add_argument("--run", help="A trained run: measure quality against calls instead of speed.")
    ap.add_argument("--real", help="SPEC:SPLIT of the real images KID compares with (with --run).")
    ap.add_argument("--train", help="SPEC:SPLIT the domain classifier trains on (with --run).")
    ap.add_argument("--features", default="domain", help="KID/faithfulness features (with --run).")
    ap.add_argument("--checkpoint", help="Checkpoint step or path (with --run; default: the latest).")
    ap.add_argument("--per-class", type=int, default=40, help="Images per class and setting (with --run).")
    ap.add_argument("--out", default="sampler-bench", help="Where the sample sets go (with --run).")
    ap.add_argument("--reuse", action="store_true",
                    help="Keep a set already in --out from the same run, --checkpoint, setting and labels.")
    ap.add_argument("--split-check", action="store_true",
                    help="Also score two same-label halves of each set: does KID's standard error match their gap?")
    ap.add_argument("--worker", nargs=5, metavar=("CONFIG", "SAMPLER", "STEPS", "SCHEDULE", "PRECISION"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick and args.settings:
        ap.error("--quick and --settings both choose the settings; give one")
    try:
        args.settings = parse_settings(QUICK if args.quick else args.settings or SETTINGS)
    except ValueError as e:
        ap.error(f"--settings: {e}")
    device = device_of(args)
    args.precisions = precisions(ap, args.precisions, device)
    if args.worker:
        name, sampler, steps, schedule, precision = args.worker
        print(json.dumps(sampling_cost(model_config(name, args), sampler, int(steps), schedule, precision, args.cfg,
                                       args.batch, (args.channels, args.resolution, args.resolution), args.classes,
                                       device)))
        return
    if args.run and not (args.real and args.train):
        ap.error("--run needs --real and --train")
    if args.run and args.set:
        ap.error("--set changes the named configs of the speed table; --run samples a trained run as it is")
    if args.reuse and not (args.run and args.checkpoint):
        ap.error("--reuse needs --run and an explicit --checkpoint")
    try:
        result = quality(args) if args.run else speed(args, device)
    except subprocess.CalledProcessError as e:  # `geca sample` or `evaluate` said why on its own error line
        raise SystemExit(e.returncode or 2) from None
    result.update({"set": args.set, "threads": args.threads, "device": str(device), "torch": torch.__version__,
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
                   platform.processor() or platform.machine()})
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if args.run:
        print(f"\n{'setting':23s} {'calls':>5s} {'× fewer':>7s} {'s/image':>8s} {'KID×10³ ± s.e.':>16s} "
              f"{'× first':>7s} {'faithful':>8s} {'× first':>7s}")
        for r in result["rows"]:
            print(f"{r['setting']:23s} {r['calls']:5d} {r['calls_vs_first']:7.2f} {r['seconds_per_image']:8.3f} "
                  f"{r['kid'] * 1e3:8.1f} ± {r['kid_se'] * 1e3:5.1f} {r['kid_vs_first']:7.2f} "
                  f"{r['faithfulness']:8.2f} {r['faithfulness_vs_first']:7.2f}")
        if "split_check" in result:
            c = result["split_check"]
            print(f"split check over {c['sets']} sets: KID gap between same-label halves {c['rms_gap'] * 1e3:.1f}×10⁻³ "
                  f"(root mean square), predicted by their standard errors {c['rms_predicted'] * 1e3:.1f}")
    else:
        print(f"\n{'config':8s} {'family':6s} {'params':>11s} {'GMAC/call':>9s} {'sampler':18s} {'prec':5s} "
              f"{'s/image':>9s} {'× fp32':>6s} {'GMAC/image':>10s} {'peak MiB':>9s} {'MFU':>6s}")
        for r in result["rows"]:
            if "error" in r:
                print(f"{r['config']:8s} {'':6s} {'':11s} {'':9s} {r.get('sampler', ''):18s} "
                      f"{r.get('precision', ''):5s} failed: {r['error']}")
                continue
            vs = f"{r['speed_vs_fp32']:6.2f}" if "speed_vs_fp32" in r else f"{'':6s}"
            print(f"{r['config']:8s} {r['family']:6s} {r['parameters']:11,d} {r['gmacs_per_call']:9.3f} "
                  f"{r['sampler'] + ' ' + str(r['steps']) + ' ' + r['schedule']:18s} {r['precision']:5s} "
                  f"{r['seconds_per_image']:9.3f} {vs} {r['gmacs_per_image']:10.4g} {r['peak_mib']:9.1f} "
                  f"{r['mfu']:6.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

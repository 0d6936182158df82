"""The study report: `report.md` (figures beside it) and a self-contained `report.html` (figures inlined).

Every number is read from what the stages wrote (their done-markers, metrics.json, results.json, log.csv).
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

import geca
from geca.downstream.report import markdown
from geca.errors import StageError
from geca.experiment.context import Context, train_id
from geca.experiment.graph import read_marker, stage_dir
from geca.metrics.report import faithful, pm
from geca.utils.io import atomic_write, atomic_write_text, csv_rows, read_json_object
from geca.utils.plots import plt

PACKAGES = ("torch", "torchvision", "numpy", "diffusers", "accelerate", "safetensors", "scikit-learn", "scipy",
            "timm", "lpips", "torch-fidelity", "matplotlib", "pillow")
MIME = {".png": "image/png", ".gif": "image/gif"}
CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px}"
       "th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}"
       "pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}h2{border-bottom:1px solid #ddd}")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|",
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return f"figures/{path.name}"


def _copy(src: Path, figures: Path, name: str) -> str:
    shutil.copyfile(src, figures / name)
    return f"figures/{name}"


class _Reader:
    """The outputs of this study's stages (`stage_ids`: stages dropped from the config are ignored)."""

    def __init__(self, ctx: Context, stage_ids: list[str]) -> None:
        self.ctx, self.root, self.ids = ctx, ctx.root, stage_ids
        self._metrics: dict[str, dict[str, Any]] = {}

    def done(self, stage_id: str) -> bool:
        return stage_id in self.ids

    def metrics(self, stage_id: str) -> dict[str, Any]:
        """A stage's metrics.json, read once (Table 1's is consulted by every section's caveat)."""
        if stage_id not in self._metrics:
            path = stage_dir(self.root, stage_id) / self.ctx.outputs(stage_id)["metrics"]
            self._metrics[stage_id] = _stage_output(path, stage_id)
        return self._metrics[stage_id]

    def kid(self, stage_id: str) -> dict[str, dict[str, float]]:
        return {r["name"]: r["kid"] for r in self.metrics(stage_id)["results"]}

    def train(self, name: str) -> dict[str, Any]:
        return self.ctx.outputs(train_id(name, self.ctx.eval_fold))


# A generator whose images are classified this little above chance (as a fraction of the way from chance to real
# images) has not learnt its classes yet: its numbers test the pipeline, they do not rank methods.
UNTRAINED_FRACTION = 0.25
# A judge that scores real images less than this above chance cannot tell whether a generator learnt its classes.
WEAK_JUDGE_MARGIN = 0.1


def _untrained(r: _Reader, names: list[str]) -> list[str]:
    """A caveat line (or none) naming the generators among `names` that Table 1 found near chance, or saying that
    the judge itself cannot tell classes apart."""
    rep = r.metrics("evaluate")
    real_f = rep["real"].get("faithfulness") or {}
    real = real_f.get("value")
    if real is None:
        return []
    if real < real_f["chance"] + WEAK_JUDGE_MARGIN:
        return [f"**The class-faithfulness judge scores real images {real:.2f} (chance {real_f['chance']:.2f}): it "
                "cannot tell whether these generators learnt their classes, and the numbers below cannot show "
                "whether they are trained enough to rank methods.**", ""]
    weak = []
    for x in rep["results"]:
        f = x.get("faithfulness") or {}
        if x["name"] in names and f.get("value") is not None and \
                f["value"] <= f["chance"] + UNTRAINED_FRACTION * (real - f["chance"]):
            weak.append(f"{x['name']} ({f['value']:.2f}, chance {f['chance']:.2f}, "
                        f"{r.train(x['name'])['steps']} training steps)")
    if not weak:
        return []
    return [f"**Near-untrained generator{'s' if len(weak) > 1 else ''}: {', '.join(weak)} — class-faithfulness "
            f"close to chance (real images: {real:.2f}); the numbers below test the pipeline and do not rank "
            "methods.**", ""]


def _quality(r: _Reader, figures: Path) -> list[str]:
    rep = r.metrics("evaluate")
    feats, gg = rep["features"], rep["gg_features"]
    real = f"`{rep['real']['spec']}:{rep['real']['split']}`" if not r.ctx.exp.data.cv else \
        f"fold {r.ctx.eval_fold}'s test patients of `{r.ctx.exp.data.spec}`"
    lines = ["## Table 1 — image quality", "",
             f"{len(rep['results'])} generated sets against {real} ({rep['real']['n']} real images), "
             f"{rep['protocol']} protocol. KID on {feats['name']} features ({feats['dim']}-d, {feats['source']}); "
             f"GG and FLD on {gg['name']} features ({gg['dim']}-d, {gg['source']}), against the training split "
             f"({rep['train']['n']} images). KID ×10³, mean ± std over subsets; LPIPS backbone: "
             f"{rep['lpips_backbone'] or 'not computed'}.", ""]
    if "random" in (feats["name"], gg["name"]) or (rep["lpips_backbone"] or "").startswith("random"):
        lines += ["**Randomly initialised feature networks: these values test the pipeline and mean nothing.**", ""]
    lines += _untrained(r, [x["name"] for x in rep["results"]])
    rows = [[x["name"], r.train(x["name"])["model"], x["n"], pm(x["kid"], 1e3), pm(x["lpips"], digits=4),
             f"{x['fld']['gg']:.2f}", f"{x['fld']['fld']:.2f}", faithful(x.get("faithfulness"))]
            for x in rep["results"]]
    lines += _table(["Generator", "Model", "N", f"KID×10³ ↓ ({feats['name']})", "LPIPS ↑", f"GG ↑ ({gg['name']})",
                     f"FLD ↓ ({gg['name']})", "faithful ↑ (chance)"], rows)
    lines += [f"Class-faithfulness: the domain classifier's accuracy on the labels each image was generated for "
              f"(macro-AUC if multi-label); on the real images it scores {faithful(rep['real'].get('faithfulness'))}.",
              ""]
    lines += ["### Samples per class: real (left) beside generated (right)", ""]
    for x in rep["results"]:
        link = _copy(stage_dir(r.root, "evaluate") / x["grid"], figures, "grid_" + x["grid"].rsplit("_grid_", 1)[-1])
        lines += [f"**{x['name']}**", "", f"![{x['name']} samples]({link})", ""]
    return lines


HEREDITY_LABEL = {"gated": "heredity-aware training (ours)", "off": "published training"}


def _ghg(r: _Reader, figures: Path) -> list[str]:
    results = {x["name"]: x for x in r.metrics("ghg")["results"]}
    outputs = r.ctx.outputs("ghg")
    sets = outputs["sets"]
    trainings = list(dict.fromkeys(s.get("heredity", "off") for s in sets))
    modes = list(dict.fromkeys(s["sampling"]["ghg"] for s in sets))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
    width = 0.8 / len(trainings)
    for i, h in enumerate(trainings):
        mine = [results[s["name"]] for s in sets if s.get("heredity", "off") == h]
        xs = [j + (i - (len(trainings) - 1) / 2) * width for j in range(len(mine))]
        axes[0].bar(xs, [v["kid"]["mean"] * 1e3 for v in mine], width, yerr=[v["kid"]["std"] * 1e3 for v in mine],
                    capsize=3, label=HEREDITY_LABEL.get(h, h))
        axes[1].bar(xs, [(v.get("faithfulness") or {}).get("value") or 0 for v in mine], width,
                    label=HEREDITY_LABEL.get(h, h))
    for ax, label in zip(axes, ("KID ×10³ ↓", "class-faithfulness ↑"), strict=True):
        ax.set_xticks(range(len(modes)), modes)
        ax.set_xlabel("inherited from step t+1 (GHG)")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Gene Heredity Guidance ({r.ctx.loaded.cellular})", fontsize=9)
    sc = sets[0]["sampling"]
    rows = [[HEREDITY_LABEL.get(s.get("heredity", "off"), ""), s["sampling"]["ghg"], pm(results[s["name"]]["kid"], 1e3),
             faithful(results[s["name"]].get("faithfulness"))] for s in sets]
    lines = ["## Fig. 5 — Gene Heredity Guidance", "",
             f"{r.ctx.loaded.cellular}, {sets[0]['images']} images per mode, {sc['sampler']} {sc['steps']} steps, "
             f"CFG {sc['guidance_scale']}; class-faithfulness is the domain classifier's accuracy on the requested "
             "labels (macro-AUC if multi-label; chance in brackets).", "", *_untrained(r, [r.ctx.loaded.cellular]),
             f"![GHG ablation]({_save(fig, figures / 'fig5_ghg.png')})", "",
             *_table(["training", "GHG", "KID×10³ ↓", "faithful ↑ (chance)"], rows)]
    for h in trainings:
        kids = {round(results[s["name"]]["kid"]["mean"], 9) for s in sets if s.get("heredity", "off") == h}
        if len(kids) == 1 and len(modes) > 1:
            lines += [f"**Every GHG mode scored the same under {HEREDITY_LABEL.get(h, h)}: the generator is too "
                      "little trained (or sampled with too few steps) for heredity to change anything.**", ""]
    for h, files in outputs.get("traces", {}).items():
        link = _copy(stage_dir(r.root, "ghg") / files["png"], figures, f"ghg_trace_{h}.png")
        lines += ["", f"Trace along one reverse chain, {HEREDITY_LABEL.get(h, h)} (mean |C_h|, |C_out|, predicted-ε "
                  f"std, x̂0 range per GHG mode; data in `ghg/{files['csv']}`):", "", f"![GHG trace, {h}]({link})"]
    return lines


def _nca_steps(r: _Reader, figures: Path) -> list[str]:
    kid = r.kid("nca_steps")
    sets = r.ctx.outputs("nca_steps")["sets"]
    ms = [s["sampling"]["nca_steps"] for s in sets]
    vals = [kid[s["name"]] for s in sets]
    trained = r.ctx.loaded.run_config(r.ctx.loaded.cellular, r.ctx.eval_fold).model.nca_steps
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    mean = [v["mean"] * 1e3 for v in vals]
    ax.errorbar(ms, mean, yerr=[v["std"] * 1e3 for v in vals], marker="o", capsize=4)
    ax.set_xticks(ms, [str(m) for m in ms])  # M is an integer
    ax.axvline(trained, color="#c44", ls="--", lw=1, label=f"trained M = {trained}")
    ax.set_xlabel("M (NCA steps per denoiser call) at sampling")
    ax.set_ylabel("KID ×10³ ↓")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ["## Fig. 6 — M at sampling (undergrowth ↔ overgrowth)", "",
            f"{r.ctx.loaded.cellular}, trained with M = {trained}, sampled without retraining; "
            f"{sets[0]['images']} images per M.", "", *_untrained(r, [r.ctx.loaded.cellular]),
            f"![M at sampling]({_save(fig, figures / 'fig6_m.png')})", "",
            *_table(["M", "KID×10³ ↓"], [[m, pm(v, 1e3)] for m, v in zip(ms, vals, strict=True)])]


def _sampler_cost(r: _Reader, figures: Path) -> list[str]:
    results = {x["name"]: x for x in r.metrics("sampler_cost")["results"]}
    rows, curves = [], {}
    sets = r.ctx.outputs("sampler_cost")["sets"]
    for s in sets:
        sc, train = s["sampling"], r.train(s["generator"])
        precision = sc.get("precision", "fp32")
        calls = sc["steps"]
        # CFG doubles each call's batch
        gmac = calls * train["macs_per_call"] * (2 if sc["guidance_scale"] != 1 else 1) / 1e9
        k, f = results[s["name"]]["kid"], results[s["name"]].get("faithfulness") or {}
        # Studies run before schedules and precisions existed spaced every sampler evenly and sampled in fp32.
        variant = s.get("variant") or ""  # CFG, GHG, M, η or clipping where not at their defaults (studies before: "")
        rows.append([s["generator"], f"{sc['sampler'].upper()} {sc['steps']}" + (f" ({variant})" if variant else ""),
                     sc.get("schedule", "uniform"),
                     precision, calls, f"{gmac:.2f}", f"{s['seconds'] / max(s['images'], 1):.3f}",
                     faithful(f), pm(k, 1e3)])
        # Error bars: KID's standard error over generated sets (studies run before it existed: the subsets' spread).
        err = k.get("se", k["std"])
        curve = f"{s['generator']} {variant}".strip() + ("" if precision == "fp32" else f" ({precision})")
        curves.setdefault(curve, []).append((calls, k["mean"] * 1e3, err * 1e3, f.get("value")))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=120)
    calls = sorted({p[0] for pts in curves.values() for p in pts})
    for name, pts in curves.items():
        pts.sort()
        axes[0].errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                         label=name)
        axes[1].plot([p[0] for p in pts if p[3] is not None], [p[3] for p in pts if p[3] is not None], marker="o",
                     label=name)
    for ax, label in zip(axes, ("KID ×10³ ↓", "class-faithfulness ↑"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks(calls, [str(c) for c in calls])
        ax.minorticks_off()
        ax.set_xlabel("denoiser calls per image")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if all(p[1] > 0 for pts in curves.values() for p in pts):  # unbiased KID can be ≤ 0; log would drop it
        axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    return ["## Sampler cost", "", "KID and class-faithfulness against the number of denoiser calls (DDPM respaced, "
            "DDIM η = 0, DPM-Solver++(2M) and its SDE form; the schedule says where the steps lie: evenly in t, in "
            "log-SNR (lambda) or as Karras et al.'s); error bars are KID's standard error over generated sets; GMAC "
            "counts matmuls and convolutions of every call (both CFG halves); seconds are wall time on the device of "
            "the sampler-cost stage, in the precision its denoiser calls ran in.", "",
            *_untrained(r, list(dict.fromkeys(s["generator"] for s in sets))),
            f"![sampler cost]({_save(fig, figures / 'sampler_cost.png')})", "",
            *_table(["Generator", "Sampler", "Schedule", "Precision", "Calls", "GMAC / image", "s / image",
                     "faithful ↑ (chance)", "KID×10³ ↓"], rows)]


def _section(stages: tuple[str, ...], build: Callable[..., Any], *args: Any) -> Any:
    """A report section from the outputs of `stages` (every section also reads train and evaluate's, for its
    caveat); outputs without what it reads, or of another kind, name the stages to look at."""
    try:
        return build(*args)
    except StageError:  # a ValueError too, already naming its file and stage
        raise
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        named = ", ".join(dict.fromkeys((*stages, "train", "evaluate")))
        raise StageError(f"an output of stage {named} lacks what the report reads ({type(e).__name__}: {e}); "
                         "redo the stage that wrote it with --force STAGE") from None


def _stage_output(path: Path, stage_id: str) -> dict[str, Any]:
    try:
        return read_json_object(path, StageError)
    except StageError as e:
        raise StageError(f"{e}; redo the stage with --force {stage_id}") from None


def _classification(r: _Reader) -> list[str]:
    summary = _stage_output(stage_dir(r.root, "classify") / r.ctx.outputs("classify")["results"], "classify")
    text = markdown(summary).split("\n", 1)[1].strip("\n")  # its own title gives way to ours
    body = [re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 1) + " ", line) for line in text.splitlines()]
    return ["## Table 2 — downstream classification", "", *_untrained(r, [g.name for g in r.ctx.exp.generators]),
            *body, ""]


def _growth(r: _Reader, figures: Path) -> list[str]:
    out = r.ctx.outputs("growth")
    d = stage_dir(r.root, "growth")
    return ["## Growth", "",
            f"One {r.ctx.loaded.cellular} organism of class *{out['label']}*: the M NCA updates at t = {out['t']} "
            "(top: ε in C_out, bottom: the clean image it implies, from the single seed cell), and the denoising "
            "trajectory (x_t above x̂₀).", "",
            f"![growth]({_copy(d / out['growth_gif'], figures, 'growth.gif')}) "
            f"![denoising]({_copy(d / out['denoise_gif'], figures, 'denoise.gif')})", ""]


def _training(r: _Reader, figures: Path, train_ids: list[str]) -> list[str]:
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=120)
    rows = []
    for sid in train_ids:
        o = r.ctx.outputs(sid)
        log = csv_rows(stage_dir(r.root, sid) / o["log"])
        if log:
            ax.plot([int(x["step"]) for x in log], [float(x["loss"]) for x in log], lw=1, label=sid[6:])
        sample = r.ctx.outputs(f"sample.{o['generator']}") if r.done(f"sample.{o['generator']}") else None
        per_image = f"{sample['seconds'] / max(sample['images'], 1):.3f}" if sample and o["fold"] == r.ctx.eval_fold \
            else "—"
        rows.append([sid[6:], o["model"], f"{o['parameters']:,}", f"{o['macs_per_call'] / 1e9:.3f}",
                     "×".join(map(str, o["input"])), o["steps"],
                     "—" if o["images_per_s"] is None else f"{o['images_per_s']:.1f}",
                     "—" if o["train_minutes"] is None else f"{o['train_minutes']:.1f}", per_image])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ["## Training and cost", "", f"![training curves]({_save(fig, figures / 'training.png')})", "",
            "Parameters and GMAC per denoiser call (batch 1; matmuls and convolutions) of each run; training "
            "throughput is the median of log.csv's images/s; sampling s/image is Table 1's sampling.", "",
            *_table(["Run", "Model", "Parameters", "GMAC / call", "Input", "Steps", "Train img/s", "Train min",
                     "Sample s / image"], rows)]


def _versions() -> list[list[str]]:
    rows = [["geca", geca.__version__]]
    for p in PACKAGES:
        try:
            rows.append([p, metadata.version(p)])
        except metadata.PackageNotFoundError:
            rows.append([p, "not installed"])
    return rows


def _reproducibility(r: _Reader, markers: list[dict[str, Any]]) -> list[str]:
    envs: dict[str, list[str]] = {}
    for m in markers:
        envs.setdefault(json.dumps(m["env"], sort_keys=True), []).append(m["stage"])
    env_rows = []
    for text, ids in envs.items():
        e = json.loads(text)
        env_rows.append([e["device"], e["cpu"], e["cpu_count"], e["torch"], e["cuda"] or "—", e["python"],
                         e["platform"], ", ".join(ids) if len(envs) > 1 else "all"])
    stage_rows = [[m["stage"], f"{m['seconds']:.1f}", m["finished"], m["key"][:12]] for m in markers]
    total = sum(m["seconds"] for m in markers)
    runs = {g.name: r.ctx.loaded.run_config(g.name, r.ctx.eval_fold).to_dict() for g in r.ctx.exp.generators}
    return ["## Reproducibility", "", f"### Stages ({total / 60:.1f} min of compute in all)", "",
            *_table(["Stage", "Seconds", "Finished", "Key"], stage_rows),
            "### Hardware and versions", "",
            *_table(["Device", "CPU", "Threads", "torch", "CUDA", "Python", "Platform", "Stages"], env_rows),
            *_table(["Package", "Version"], _versions()),
            f"### Experiment config (`{r.ctx.loaded.path}`)", "", "```yaml", r.ctx.loaded.text.rstrip(), "```", "",
            "### Resolved run configs" + (f" (fold {r.ctx.eval_fold})" if r.ctx.eval_fold is not None else ""), "",
            "```yaml", yaml.safe_dump(runs, sort_keys=False).rstrip(), "```", ""]


def to_html(markdown_text: str, base: Path, title: str) -> str:
    """Render the markdown and inline every `figures/…` image as a base64 data URI."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)

    def inline(m: re.Match[str]) -> str:
        path = base / html.unescape(m.group(1))
        return f'src="data:{MIME[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="(figures/[^"]+)"', inline, body)
    body = re.sub(r'(<pre><code class="language-yaml">.*?</code></pre>)',
                  lambda m: f"<details><summary>YAML ({m.group(1).count(chr(10))} lines)</summary>{m.group(1)}"
                            "</details>", body, flags=re.S)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}</body></html>\n")


def write_report(ctx: Context, out: Path, stage_ids: list[str]) -> dict[str, Any]:
    """Write report.md, report.html and figures/ into `out` from the outputs of the (done) stages `stage_ids`."""
    r = _Reader(ctx, stage_ids)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    markers = sorted((read_marker(ctx.root, i) for i in stage_ids), key=lambda m: m["finished"])
    train_ids = [m["stage"] for m in markers if m["stage"].startswith("train.")]
    exp = ctx.exp
    d = exp.data
    split = "fixed train/val/test split" if not d.cv else \
        f"patient-level CV, folds {', '.join(map(str, ctx.loaded.folds))} of `{ctx.loaded.folds_file}`"
    lines = [f"# GeCA study `{exp.name}`", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} by geca {geca.__version__} from `{ctx.loaded.path}`. "
             f"Data: `{d.spec}`" + (f" at {d.image_size} px" if d.image_size else "") +
             (f", latent (VAE `{d.vae}`)" if d.vae else "") + f"; {split}. Generators: " +
             _section(("train",), lambda: ", ".join(f"{g.name} ({r.train(g.name)['model']})"
                                                    for g in exp.generators)) + ".", ""]
    lines += _section(("evaluate",), _quality, r, figures)
    for stage_id, section in (("ghg", _ghg), ("nca_steps", _nca_steps), ("sampler_cost", _sampler_cost)):
        if r.done(stage_id):
            lines += _section((stage_id,), section, r, figures)
    if r.done("classify"):
        lines += _section(("classify",), _classification, r)
    if r.done("growth"):
        lines += _section(("growth",), _growth, r, figures)
    lines += _section(("train", "sample"), _training, r, figures, train_ids)
    lines += _reproducibility(r, markers)
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", to_html(text, out, f"GeCA study {exp.name}"))
    return {"markdown": "report.md", "html": "report.html", "figures": sorted(p.name for p in figures.iterdir())}

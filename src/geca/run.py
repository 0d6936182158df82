"""The run directory as one concept: what a run is (`model.json`), its checkpoints, and loading it back.

A run directory holds `config.yaml`, `model.json` (a ModelSpec: enough to rebuild the denoiser without the data),
`log.csv`, `samples/` and `checkpoints/step_NNNNNNN/{model,ema}.safetensors, optimizer.pt, state.json` with
`checkpoints/latest.json` pointing at the newest; `checkpoints/best/` when training validates.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from geca.data.config import DataConfig
from geca.data.folds import folds_status
from geca.data.imageset import ImageSet
from geca.data.registry import canonical_spec, load_split
from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import CheckpointError, ConfigError, MissingCheckpointError
from geca.latent.spec import LatentSpec
from geca.models.base import Denoiser
from geca.models.build import build_model
from geca.models.config import ModelConfig, from_geca_0_1
from geca.utils.hardware import can_compile
from geca.utils.io import (
    atomic_write_json,
    csv_rows,
    delete_dir,
    file_sha256,
    read_json_object,
    same_path,
    same_source,
    staged_dir,
)
from geca.utils.schema import Checks, changes, from_dict

# Model keys that change how the maths runs, not what it computes (the same weights, the same outputs up to rounding).
EXECUTION = ("compile", "attention", "checkpointing", "skip_idle")
# Data keys that change where the data comes from or how it is augmented, not what the model is trained on: a resume
# may change them (the command prints what changed).
LOGISTICS = ("download", "latent_cache", "flip")
SPEC_FORMAT = 2  # 1: geca 0.1, whose model.json held every family's fields
BEST = "best"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a run's denoiser without its training data."""

    model: ModelConfig
    diffusion: DiffusionConfig
    data: DataConfig
    in_channels: int
    num_classes: int
    resolution: int
    class_names: list[str]
    multilabel: bool
    latent: LatentSpec | None = None  # set when the denoiser works on VAE latents (in_channels/resolution are theirs)
    # The folds file's SHA-256 when the run was trained on a fold (data.folds_file is then its absolute path): the
    # name alone would let a rewritten file (geca folds --overwrite) pass for the split the run trained on.
    folds_sha256: str | None = None
    data_key: str | None = None  # what names the training images (geca.data.registry.source_key), for leakage checks
    format: int = SPEC_FORMAT

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser generates: pixels, or latents for a latent run."""
        return self.in_channels, self.resolution, self.resolution

    def build(self, compile: bool = False) -> Denoiser:
        return build_model(self.model, self.in_channels, self.num_classes, self.resolution, compile)

    def diffusion_process(self) -> GaussianDiffusion:
        return GaussianDiffusion.from_config(self.diffusion)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, other: ModelSpec) -> list[str]:
        """Where `other` describes another model, diffusion or data than this spec (whatever version wrote them), as
        'key: this → other' lines. How the model is executed (EXECUTION) and where its data comes from (LOGISTICS)
        may differ: a run moved to a GPU resumes with `--attention triton`; so may the folds file's path, not its
        folds."""

        def setup(spec: ModelSpec) -> dict[str, Any]:
            d = spec.to_dict()
            data = {k: v for k, v in d["data"].items() if k not in (*LOGISTICS, "folds_file")}
            return {**d, "format": 0, "folds_sha256": None, "data_key": None,
                    "model": {k: v for k, v in d["model"].items() if k not in EXECUTION},
                    "data": {**data, "spec": canonical_spec(data["spec"])}}

        found = [f"{k}: {x!r} → {y!r}" for k, x, y in changes(setup(self), setup(other))]
        if self.data_key == other.data_key and str(self.data_key).startswith("npz:"):
            # the same arrays under another path: an npz moved or copied since the run began
            found = [line for line in found if not line.startswith("data.spec:")]
        a, b = self.data.folds_file, other.data.folds_file
        if not self._same_folds(other):
            found.append(f"data.folds_file: {a} has changed since the run was trained (its SHA-256 differs from "
                         "model.json's folds_sha256; restore the file)" if a and b and same_path(a, b) else
                         f"data.folds_file: {a!r} → {b!r}" + (" (other folds)" if a and b else ""))
        return sorted(found)

    def training_split(self) -> dict[str, Any]:
        """The split the run trained on, as a synthetic set's manifest records it for classify's leakage check."""
        d = self.data
        return {"data": d.spec, "data_key": self.data_key, "folds_file": d.folds_file,
                "folds_sha256": self.folds_sha256, "fold": None if d.folds_file is None else d.fold,
                "cv_val": d.cv_val}

    def _same_folds(self, other: ModelSpec) -> bool:
        a, b = self.data.folds_file, other.data.folds_file
        if a is None or b is None:
            return a is None and b is None
        if self.folds_sha256 and other.folds_sha256:
            return self.folds_sha256 == other.folds_sha256
        return same_source(a, b)  # a run from before the SHA-256 was recorded

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        if not isinstance(d, dict):
            return from_dict(cls, d, "model.json")  # its own message: not a mapping
        if "format" not in d and isinstance(d.get("model"), dict):
            d = {**d, "model": from_geca_0_1(d["model"]), "format": 1}
        model = d.get("model")
        if isinstance(model, dict) and model.get("family", "geca") == "geca" and "heredity" not in model:
            d = {**d, "model": {**model, "heredity": "off"}}  # saved before heredity existed: the published training
        return from_dict(cls, d, "model.json")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_checkpoints(run_dir: Path) -> dict[int, Path]:
    """A run's checkpoints/step_NNNNNNN folders by step, in step order."""
    found = ((re.fullmatch(r"step_(\d{7,})", p.name), p) for p in checkpoint_dir(run_dir).glob("step_*"))
    return dict(sorted((int(m[1]), p) for m, p in found if m and p.is_dir()))


def prune_checkpoints(run_dir: Path, keep: int) -> list[int]:
    """Delete all but the `keep` latest step checkpoints (never the one latest.json names; `best` is no step
    checkpoint); returns the steps deleted. Each is renamed before it is deleted, so an interruption leaves no
    half-deleted checkpoint, only a hidden folder the next pruning removes."""
    root = checkpoint_dir(run_dir)
    for left in root.glob(".step_*.pruned"):
        shutil.rmtree(left, ignore_errors=True)
    latest = find_checkpoint(run_dir)
    steps = step_checkpoints(run_dir)
    gone = [step for step in list(steps)[:-keep] if steps[step].name != latest.name]
    for step in gone:
        delete_dir(steps[step], root / f".{steps[step].name}.pruned")
    return gone


def _safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def save_weights(directory: Path, model: torch.nn.Module, ema: torch.nn.Module) -> None:
    save_file(_safetensors(model), directory / "model.safetensors")
    save_file(_safetensors(ema), directory / "ema.safetensors")


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """state.json, with the SHA-256 of every file beside it: a flipped byte is found before anything uses it."""
    files = {f.name: file_sha256(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != "state.json"}
    (directory / "state.json").write_text(json.dumps({**state, "files": files}, indent=2))


def save_checkpoint(run_dir: Path, step: int, model: Denoiser, ema: Denoiser, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write checkpoints/step_NNNNNNN/ as a whole, then point latest.json at it."""
    root = checkpoint_dir(run_dir)
    name = f"step_{step:07d}"
    with staged_dir(root / name) as tmp:
        save_weights(tmp, model, ema)
        try:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        except RuntimeError as e:  # torch reports a full disk as a RuntimeError of its zip writer
            raise CheckpointError(f"{tmp / 'optimizer.pt'}: could not be written ({str(e).splitlines()[0]})") from None
        write_state(tmp, {"step": step, **state})
    atomic_write_json(root / "latest.json", {"step": step, "path": name})
    return root / name


def read_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's state.json ({} for checkpoints written without one)."""
    path = Path(checkpoint) / "state.json"
    if not path.exists():
        return {}
    state = read_json_object(path, CheckpointError)
    files = state.get("files", {})
    if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise CheckpointError(f"{path}: corrupt checkpoint state (files is not a mapping of names to SHA-256s)")
    return state


def verify(path: Path, sha256: str | None = None) -> None:
    """Refuse a checkpoint file whose SHA-256 (`sha256` if already known) differs from the one its state.json
    recorded at save time."""
    expected = read_state(path.parent).get("files", {}).get(path.name)
    if expected is not None and path.exists() and (sha256 or file_sha256(path)) != expected:
        raise CheckpointError(f"{path}: corrupt (its SHA-256 differs from the one recorded when it was saved)")


def find_checkpoint(run_dir: Path, which: str | int | Path | None = None) -> Path:
    """`which`: None/'latest', 'best' (lowest validation KID), a step number, or a checkpoint directory path."""
    run_dir, which = Path(run_dir), None if which is None else str(which)
    if which is not None and not which.strip():
        raise CheckpointError("--checkpoint is empty; give 'latest', 'best', a step number or a directory")
    root = checkpoint_dir(run_dir)
    if which in (None, "latest"):
        latest = root / "latest.json"
        if not latest.exists():
            raise CheckpointError(f"{run_dir}: no checkpoint found (expected {latest}); has this run been trained?")
        try:
            name = json.loads(latest.read_text())["path"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{latest}: corrupt pointer file ({e})") from None
        if not (isinstance(name, str) and re.fullmatch(r"step_\d{7,}", name)):
            raise CheckpointError(f"{latest}: corrupt pointer file (path {name!r} is not a step_NNNNNNN folder of "
                                  "this run)")
        path = root / name
    elif which == BEST:
        path = root / BEST
        if not path.is_dir():
            raise CheckpointError(f"{path}: no best checkpoint; it is kept only when training validates "
                                  "(validation.every > 0 or --validate-every)")
    elif (step := re.fullmatch(r"(?:step_)?(\d+)", which)) is not None:
        # a name is a name even where a folder of that name is in the working directory
        path = root / f"step_{int(step[1]):07d}"
        if not path.is_dir():
            steps = list(step_checkpoints(run_dir))
            raise CheckpointError(f"--checkpoint {which}: {run_dir} has no checkpoint of step {int(step[1])}; it has "
                                  f"{', '.join(map(str, steps)) if steps else 'none'}")
    elif Path(which).is_dir():
        return Path(which)
    else:
        raise CheckpointError(f"--checkpoint {which!r}: neither 'latest', 'best', a step number nor a directory")
    if not path.is_dir():
        raise MissingCheckpointError(f"{path}: checkpoint directory missing")
    return path


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's weights, verified against its recorded SHA-256 and finite (a diverged run is refused), and
    the SHA-256 of the very bytes they were read from (what a sample set's manifest records)."""
    if not path.exists():
        raise CheckpointError(f"{path}: weights file missing")
    raw = path.read_bytes()
    sha256 = hashlib.sha256(raw).hexdigest()
    verify(path, sha256)
    try:
        weights = load_safetensors(raw)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]} holds NaN or infinite values (the run diverged); use an earlier "
                              "checkpoint (--checkpoint STEP)")
    return weights, sha256


def _upgrade_keys(weights: dict[str, Any]) -> dict[str, Any]:
    """geca 0.1 named the final layer's parts final_ada / final; they now live in one FinalLayer."""
    renamed = {}
    for k, v in weights.items():
        if k.startswith("final_ada."):
            k = "final.ada." + k[len("final_ada."):]
        elif k in ("final.weight", "final.bias"):
            k = "final.linear." + k.split(".")[1]
        renamed[k] = v
    return renamed


def load_state_dict_into(model: torch.nn.Module, path: Path) -> str:
    """Load the safetensors file `path` into `model`, strictly: every key, every shape; returns the file's SHA-256."""
    weights, sha256 = load_weights(path)  # its own errors (missing, corrupt, diverged) say so themselves
    weights = _upgrade_keys(weights)
    own = model.state_dict()
    for key, tensor in weights.items():  # load_state_dict would cast integers into float weights without a word
        if key in own and tensor.dtype.is_floating_point != own[key].dtype.is_floating_point:
            raise CheckpointError(f"{path}: weights do not fit the model ({key} holds {tensor.dtype}, the model's "
                                  f"{own[key].dtype})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        # torch's first line names only the model class; the first of its reasons says what does not fit
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[1] if len(lines) > 1 else lines[0] if lines else "no reason given"
        reason = reason if len(reason) <= 300 else reason[:300] + " …"
        raise CheckpointError(f"{path}: weights do not fit the model ({reason})") from None
    return sha256


def read_spec(run_dir: Path) -> ModelSpec:
    path = Path(run_dir) / "model.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; {run_dir} is not a geca run directory")
    try:
        spec = ModelSpec.from_dict(json.loads(path.read_text()))
        # an edited or damaged model.json gets the checks a config gets, before any model is built from it
        check = Checks()
        check(spec.format <= SPEC_FORMAT, "format", f"≤ {SPEC_FORMAT} (a newer geca wrote it)", spec.format)
        spec.model.validate(check)
        spec.diffusion.validate(check)
        for key in ("in_channels", "num_classes", "resolution"):
            check(getattr(spec, key) >= 1, key, "≥ 1", getattr(spec, key))
        check(len(spec.class_names) == spec.num_classes, "class_names", f"{spec.num_classes} names (num_classes)",
              spec.class_names)
        return spec
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: invalid ({e})") from None


@dataclass
class LoadedRun:
    """A run's denoiser (in eval mode, on its device) with everything sampling needs to know about it."""

    model: Denoiser
    spec: ModelSpec
    diffusion: GaussianDiffusion
    checkpoint: Path
    weights_file: Path
    weights_sha256: str
    step: int

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent


def load_run(run_dir: Path, checkpoint: str | int | None = None, weights: str = "ema",
             device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's denoiser from model.json and a checkpoint's EMA (default) or raw weights."""
    if weights not in ("ema", "model"):
        raise CheckpointError(f"--weights must be 'ema' or 'model', got {weights!r}")
    spec = read_spec(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    if ckpt.resolve().parent.parent != Path(run_dir).resolve():
        # model.json and the lineage checks (expand's folds) are the run's: another run's weights would pass as its
        raise CheckpointError(f"--checkpoint {ckpt}: not a checkpoint of --run {run_dir}; pass that checkpoint's own "
                              "run as --run")
    wfile = ckpt / f"{weights}.safetensors"
    # Sampling compiles only when the run asked for it (model.compile true) and it can here; eager is the same maths.
    model = spec.build(compile=spec.model.compile == "true" and can_compile(torch.device(device)))
    sha256 = load_state_dict_into(model, wfile)
    return LoadedRun(model=model.to(device).eval(), spec=spec, diffusion=spec.diffusion_process(), checkpoint=ckpt,
                     weights_file=wfile, weights_sha256=sha256, step=int(read_state(ckpt).get("step", -1)))


def run_folds(spec: ModelSpec) -> str | None:
    """The run's folds file, checked to hold the folds it was trained on (a run from before geca recorded their
    SHA-256 is taken at its word)."""
    path = spec.data.folds_file
    if path is None or spec.folds_sha256 is None:
        return path
    status = folds_status(path, spec.folds_sha256)
    where = f"{path}: the run's folds file (model.json data.folds_file)"
    if status == "missing":
        raise ConfigError(f"{where} is missing; restore the file the run was trained with")
    if status == "changed":
        raise ConfigError(f"{where} has changed since the run was trained (its SHA-256 differs from model.json's "
                          "folds_sha256): other folds are another split, whose test patients the run may have "
                          "trained on; restore the file the run was trained with")
    return path


def run_split(run: LoadedRun, data_spec: str, split: str, folds_file: str | None, fold: int) -> ImageSet:
    """A split of dataset `data_spec` (at the run's image size) whose classes must be the run's."""
    d = run.spec.data
    images = load_split(data_spec, split, image_size=d.image_size, folds_file=folds_file, fold=fold, cv_val=d.cv_val)
    if images.class_names != run.spec.class_names:
        raise ConfigError(f"{data_spec}:{split} has classes {images.class_names}, the run was trained on "
                          f"{run.spec.class_names}")
    return images


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int] | None:
    """A safetensors file's header (tensor name → dtype, shape, offsets) and its length; None without one."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if n <= 100 * 2**20 else None
        if not isinstance(header, dict):
            return None
        header.pop("__metadata__", None)
        return header, n
    except (OSError, ValueError):
        return None


def _safetensors_damage(path: Path) -> str | None:
    """'damaged' (no safetensors header) or 'truncated' (shorter or longer than its header says), found without
    hashing the file; None where it looks whole."""
    found = _safetensors_header(path)
    if found is None:
        return "damaged"
    header, n = found
    try:
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, AttributeError):
        return "damaged"
    return None if path.stat().st_size == 8 + n + end else "truncated"


def _misfit(spec: ModelSpec, checkpoint: Path) -> str | None:
    """What keeps the weights from fitting the model model.json describes, read from the files' headers (a run's
    folder given another run's checkpoint or model.json); None where they fit."""
    try:
        with torch.device("meta"):  # shapes without memory or initialisation
            own = {k: list(v.shape) for k, v in spec.build().state_dict().items()}
    except Exception as e:  # a model.json edited into settings no model has (the builders raise many kinds)
        return f"model.json describes no model ({type(e).__name__}: {e})"
    for name in ("model.safetensors", "ema.safetensors"):
        header, _ = _safetensors_header(checkpoint / name) or ({}, 0)
        if _upgrade_keys({k: v.get("shape") for k, v in header.items()}) != own:
            return f"{name} does not fit model.json"
    return None


def checkpoint_health(checkpoint: Path, hashes: bool = True, state_expected: bool = True) -> str:
    """'ok', or what keeps the checkpoint from loading: a missing file, or (with `hashes`) a file whose SHA-256
    differs from the one recorded at save time (read, not loaded). geca 0.1 wrote no state.json
    (`state_expected` False)."""
    for name in ("model.safetensors", "ema.safetensors"):
        if not (checkpoint / name).is_file():
            return f"missing {name}"
        if (checkpoint / name).stat().st_size == 0:  # found without hashing (--quick): no weights file is empty
            return f"empty {name}"
        cut = _safetensors_damage(checkpoint / name)
        if cut:
            return f"{cut} {name}"
    if state_expected and not (checkpoint / "state.json").is_file():
        return "missing state.json"
    try:
        recorded = read_state(checkpoint).get("files", {})
    except CheckpointError:
        return "damaged state.json"
    for name in recorded:
        if not (checkpoint / name).is_file():
            return f"missing {name}"
        if hashes:
            try:
                verify(checkpoint / name)
            except CheckpointError:
                return f"damaged {name}"
    return "ok"


def summarize_run(run_dir: Path, hashes: bool = True) -> dict[str, Any]:
    """One line about a run directory, read from its files without loading any weights (a damaged part is "?"); its
    status is the latest and best checkpoints' health (their files hashed unless `hashes` is False), or what is
    missing."""
    run_dir = Path(run_dir)
    row: dict[str, Any] = {"run": str(run_dir), "status": "ok", "step": None, "model": "?", "data": "?",
                           "folds_file": None, "fold": None, "heredity": None, "loss": None, "best_kid": None,
                           "best_step": None}
    spec = None
    try:
        spec = read_spec(run_dir)
        row.update(model=spec.model.name, data=spec.data.spec, heredity=getattr(spec.model, "heredity", None))
        if spec.data.folds_file is not None:
            row.update(folds_file=spec.data.folds_file, fold=spec.data.fold)
            if spec.folds_sha256 is not None and (status := folds_status(spec.data.folds_file,
                                                                          spec.folds_sha256)) != "ok":
                row["status"] = f"folds file {status}"
    except CheckpointError:
        row["status"] = "damaged model.json"
    except OSError as e:  # a folds file that cannot be read here
        row["status"] = f"folds file unreadable ({e.strerror})"
    state_expected = spec is not None and spec.format >= 2  # geca 0.1 (format 1) wrote no state.json
    try:
        ckpt = find_checkpoint(run_dir)
    except CheckpointError as e:
        ckpt = None
        row["status"] = "no checkpoint" if not (checkpoint_dir(run_dir) / "latest.json").exists() else \
            "missing checkpoint folder" if isinstance(e, MissingCheckpointError) else "damaged latest.json"
    if ckpt is not None:
        if row["status"] == "ok":
            row["status"] = checkpoint_health(ckpt, hashes, state_expected)
        if row["status"] == "ok" and spec is not None and (misfit := _misfit(spec, ckpt)):
            row["status"] = misfit
        try:
            row["step"] = read_state(ckpt).get("step")
        except CheckpointError:
            pass
    try:
        rows = csv_rows(run_dir / "log.csv")
    except (csv.Error, UnicodeDecodeError):
        rows = []
    try:
        row["loss"] = float(rows[-1]["loss"]) if rows else None
    except (KeyError, TypeError, ValueError):  # a damaged last row
        row["loss"] = None
    best = checkpoint_dir(run_dir) / BEST
    try:
        state = read_state(best)
        row.update(best_kid=state.get("kid"), best_step=state.get("step"))
    except CheckpointError:
        pass
    if best.is_dir() and row["status"] == "ok" and (health := checkpoint_health(best, hashes, state_expected)) != "ok":
        row["status"] = f"best: {health}"
    return row

"""What a run is: `model.json`, a ModelSpec, enough to rebuild the denoiser without the data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from geca.data.config import DataConfig
from geca.data.registry import canonical_spec
from geca.diffusion.config import DiffusionConfig
from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import CheckpointError, ConfigError
from geca.latent.spec import LatentSpec
from geca.models.base import Denoiser
from geca.models.build import build_model
from geca.models.config import ModelConfig, from_geca_0_1
from geca.utils.io import same_path, same_source
from geca.utils.schema import Checks, changes, from_dict

# Model keys that change how the maths runs, not what it computes (the same weights, the same outputs up to rounding).
EXECUTION = ("compile", "attention", "checkpointing", "skip_idle")
# Data keys that change where the data comes from or how it is augmented, not what the model is trained on: a resume
# may change them (the command prints what changed).
LOGISTICS = ("download", "latent_cache", "flip")
SPEC_FORMAT = 2  # 1: geca 0.1, whose model.json held every family's fields


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
        if self.latent and other.latent and self.latent.vae_sha256 == other.latent.vae_sha256:
            # the same VAE weights in another folder: a VAE moved since the run began
            found = [line for line in found if not line.startswith(("data.vae:", "latent.vae:"))]
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

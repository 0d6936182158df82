"""What a run trains on: the `data` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass

from geca.utils.schema import MAX_IMAGE_SIZE, Checks

CV_VAL = ("slice", "next-fold")


@dataclass
class DataConfig:
    spec: str = "retinamnist"
    image_size: int | None = None
    folds_file: str | None = None
    fold: int = 0
    cv_val: str = "slice"  # with a folds file: how the validation split is made (geca.data.folds.fold_split_rows)
    flip: bool = True
    download: bool = False
    # Latent diffusion (paper §3, as LDM): a diffusers AutoencoderKL directory (or a hub id in the local HF cache);
    # None trains in pixel space. Images are cropped/resized to latent_size; the cache defaults to RUN/latents.
    vae: str | None = None
    latent_size: int = 256
    latent_mean: bool = False
    latent_cache: str | None = None

    def validate(self, check: Checks) -> None:
        check(bool(self.spec.strip()), "data.spec", "a dataset spec", self.spec)
        check(self.image_size is None or 2 <= self.image_size <= MAX_IMAGE_SIZE, "data.image_size",
              f"in [2, {MAX_IMAGE_SIZE}]", self.image_size)
        check(self.fold >= 0, "data.fold", "≥ 0", self.fold)
        check.choice(self.cv_val, "data.cv_val", CV_VAL)
        # without a folds file the data's fixed split is used: a fold would be ignored, silently
        check(self.folds_file is not None or self.fold == 0, "data.fold", "0 without a folds file (--folds-file)",
              self.fold)
        check(self.folds_file is not None or self.cv_val == "slice", "data.cv_val",
              "left at slice without a folds file (--folds-file)", self.cv_val)
        check(self.latent_size >= 8, "data.latent_size", "≥ 8", self.latent_size)

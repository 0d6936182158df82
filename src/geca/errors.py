"""The errors a user can cause. The command line prints each as one `error:` line and exits with status 2."""

from __future__ import annotations


class GecaError(Exception):
    """Base of every error whose message is meant for the user (it names the file or flag at fault)."""


class DataError(GecaError, ValueError):
    """Bad or missing input data; the message names the file and what was expected."""


class ConfigError(GecaError, ValueError):
    """A config file, flag or override that does not fit the schema or the data."""


class CheckpointError(GecaError, RuntimeError):
    """A run directory or checkpoint that is missing, corrupt or does not fit."""


class MissingCheckpointError(CheckpointError):
    """The checkpoint folder a run's latest.json names is not there."""


class TrainingError(GecaError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to try."""


class LatentError(DataError):
    """A VAE or latent cache that is missing, corrupt or does not fit; the message names it."""


class MissingWeightsError(GecaError, FileNotFoundError):
    """A pretrained weight file that is not on disk; the message names the file and how to get it."""


class StageError(ConfigError):
    """A study stage selection that cannot run (unknown stage, or `--only` with inputs that are not done)."""

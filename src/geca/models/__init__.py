"""Denoisers: GeCA and the interface the diffusion and samplers use."""

from geca.models.base import CellState, Denoiser, DenoiserOutput
from geca.models.config import NAMED_MODELS, ModelConfig, build_model, count_parameters, named_model

__all__ = ["CellState", "Denoiser", "DenoiserOutput", "ModelConfig", "NAMED_MODELS", "build_model",
           "count_parameters", "named_model"]

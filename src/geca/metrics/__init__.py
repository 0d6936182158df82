"""Evaluation metrics: KID, LPIPS diversity, FLD / generalization gap, and the feature networks they use."""

from geca.metrics.diversity import LPIPSResult, load_lpips, lpips_diversity, lpips_pairs
from geca.metrics.features import FEATURES, FeatureExtractor, build_extractor
from geca.metrics.fld import FLDResult, fld
from geca.metrics.kid import PROTOCOLS, KIDResult, kid, kid_subset_size
from geca.metrics.weights import MissingWeightsError

__all__ = [
    "FEATURES",
    "PROTOCOLS",
    "FLDResult",
    "FeatureExtractor",
    "KIDResult",
    "LPIPSResult",
    "MissingWeightsError",
    "build_extractor",
    "fld",
    "kid",
    "kid_subset_size",
    "load_lpips",
    "lpips_diversity",
    "lpips_pairs",
]

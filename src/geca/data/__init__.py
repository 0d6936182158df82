"""Datasets: MedMNIST npz files, folder + CSV, and procedural fundus/OCT sets."""

from geca.data.imageset import DataError, ImageSet
from geca.data.registry import load_split, parse_spec

__all__ = ["DataError", "ImageSet", "load_split", "parse_spec"]

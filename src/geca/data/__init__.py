"""Datasets: MedMNIST npz files, folder + CSV, procedural fundus/OCT sets, and patient-level folds.

`registry.load_split(spec, split)` is the one entry point; every loader returns an `imageset.ImageSet`.
"""

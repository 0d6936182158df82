"""Sampling: sampler settings (`config.py`); the DDPM, DDIM and DPM-Solver++ loops with classifier-free and Gene
Heredity Guidance (`samplers.py`); label vectors to sample (`labels.py`); labelled sample sets on disk
(`generate.py`); training-set expansion (`expand.py`); an organism's growth (`growth.py`) and a GHG trace of the cell
state across reverse steps (`trace.py`)."""

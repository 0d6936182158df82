"""Sampling: the DDPM/DDIM loop with classifier-free and Gene Heredity Guidance (`samplers.py`), labelled sample
sets on disk (`generate.py`), training-set expansion (`expand.py`) and an organism's growth (`growth.py`)."""

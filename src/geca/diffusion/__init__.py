"""The diffusion process (`gaussian.py`): schedules, respacing, forward process, posterior and the training loss."""

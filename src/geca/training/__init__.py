"""Training: the loop (`trainer.py`), EMA, and validation during training (`validation.py`)."""

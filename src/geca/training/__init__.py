"""Training: the loop (`trainer.py`), what it trains on (`data.py`), the processes' collectives (`distributed.py`),
resuming from a checkpoint (`resume.py`), EMA (`ema.py`), heredity-aware training's hand-over of cell state
(`heredity.py`), compiling the model for a run (`compile.py`) and validation during training (`validation.py`)."""

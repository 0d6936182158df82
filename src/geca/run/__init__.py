"""The run directory as one concept: what a run is (`model.json`), its checkpoints, and loading it back.

A run directory holds `config.yaml`, `model.json` (a ModelSpec: enough to rebuild the denoiser without the data),
`log.csv`, `samples/` and `checkpoints/step_NNNNNNN/{model,ema}.safetensors, optimizer.pt, state.json` with
`checkpoints/latest.json` pointing at the newest; `checkpoints/best/` when training validates.
"""

from geca.run.checkpoints import (
    BEST,
    checkpoint_dir,
    find_checkpoint,
    load_state_dict_into,
    load_weights,
    prune_checkpoints,
    read_state,
    save_checkpoint,
    save_weights,
    step_checkpoints,
    verify,
    write_state,
)
from geca.run.health import checkpoint_health, summarize_run
from geca.run.loaded import LoadedRun, load_run, run_folds, run_split
from geca.run.spec import EXECUTION, LOGISTICS, SPEC_FORMAT, ModelSpec, read_spec

__all__ = ["BEST", "EXECUTION", "LOGISTICS", "SPEC_FORMAT", "LoadedRun", "ModelSpec", "checkpoint_dir",
           "checkpoint_health", "find_checkpoint", "load_run", "load_state_dict_into", "load_weights",
           "prune_checkpoints", "read_spec", "read_state", "run_folds", "run_split", "save_checkpoint",
           "save_weights", "step_checkpoints", "summarize_run", "verify", "write_state"]

"""The glibc setting the `geca` command applies: freed tensor memory stays in the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")

# Rounds of two 32 MiB temporaries, as a denoiser call makes with its activations; faults counted once the
# process has warmed up (the heap's first rounds still fault in while it grows).
PROBE = """
import json, resource, sys, torch
from geca.utils.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
torch.set_num_threads(1)
x = torch.randn(8 * 2**20)
def work():
    y = x * 2
    return float((y + x).sum())
for _ in range(6):
    work()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    work()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start}))
"""
ROUND_PAGES = 2 * 8 * 2**20 * 4 // 4096


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "GECA_NO_MALLOC_TUNING")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_large_blocks_are_reused_without_page_faults() -> None:
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["applied"]
    # Glibc as it comes maps and faults in every page of every round; kept memory is reused.
    assert default["faults"] >= 6 * ROUND_PAGES * 0.9
    assert tuned["faults"] < default["faults"] / 4


@pytest.mark.parametrize("env", [{"GECA_NO_MALLOC_TUNING": "1"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"LD_PRELOAD": ""}])
def test_user_allocator_choices_are_left_alone(env: dict[str, str]) -> None:
    result = _probe("tuned", **env)
    assert not result["applied"]
    assert result["faults"] >= 6 * ROUND_PAGES * 0.9


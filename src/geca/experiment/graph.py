"""Stages, their done-markers and the resumable run: what is done is skipped, what changed is redone.

A stage's key hashes its id, its parameters (its slice of the config) and the `run_id` of each upstream stage's
marker. A stage that runs gets a fresh `run_id`, so redoing a stage (its config changed, or `--force`) changes the
key of everything downstream, which is then redone too; nothing else is.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from geca.errors import StageError
from geca.utils.io import atomic_write_json, file_sha256, read_json_object, real_dir, staged_dir

MARKER = "done.json"
PENDING = ".pending.json"  # hidden: a training run may start in the folder
OLD_PENDING = "pending.json"  # its name before geca 2026-11-27: such a folder is the study's too


@dataclass
class Stage:
    """One step of the study: `perform(directory)` writes its outputs there and returns a JSON-able summary.

    `resumable` stages keep their directory when re-entered with the same key (training resumes from its latest
    checkpoint); the others start from an empty directory.
    """

    id: str
    perform: Callable[[Path], dict[str, Any]]
    deps: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    resumable: bool = False


def stage_dir(root: Path, stage_id: str) -> Path:
    """`train.GeCA.f1` → ROOT/train/GeCA-f1; `evaluate` → ROOT/evaluate."""
    group, *rest = stage_id.split(".")
    return Path(root) / group / "-".join(rest) if rest else Path(root) / group


def _read_own(path: Path) -> dict[str, Any] | None:
    """A marker this module wrote; None where it is missing or damaged (its stage is then not done, and redone)."""
    try:
        return read_json_object(path, StageError)
    except StageError:
        return None


def read_marker(root: Path, stage_id: str) -> dict[str, Any] | None:
    return _read_own(stage_dir(root, stage_id) / MARKER)


def stage_key(stage: Stage, markers: dict[str, dict[str, Any]]) -> str:
    blob = {"stage": stage.id, "params": stage.params, "deps": {d: markers[d]["run_id"] for d in stage.deps}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def environment() -> dict[str, Any]:
    """Where a stage ran: versions and hardware."""
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "cpu": _cpu_name(),
            "cpu_count": torch.get_num_threads(), "platform": platform.platform(), "host": platform.node()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def select(stages: list[Stage], selectors: list[str], flag: str) -> set[str]:
    """Stage ids matched by `selectors`: an id, or a prefix of dotted parts (`train` = every `train.*`)."""
    chosen: set[str] = set()
    for sel in selectors:
        hits = {s.id for s in stages if s.id == sel or s.id.startswith(sel + ".")}
        if not hits:
            groups = sorted({s.id.split(".")[0] for s in stages} | {s.id for s in stages})
            raise StageError(f"{flag} {sel!r}: no such stage; stages: {', '.join(groups)}")
        chosen |= hits
    return chosen


@dataclass
class Step:
    stage: Stage
    action: str  # "skip" or "run"
    reason: str


def plan(stages: list[Stage], root: Path, force: list[str] | None = None,
         only: list[str] | None = None) -> list[Step]:
    """What a run would do, in order (`stages` must be in dependency order); `--only` restricts it to the chosen
    stages, whose inputs must then be done or chosen too."""
    chosen = select(stages, only, "--only") if only else {s.id for s in stages}
    forced = select(stages, force or [], "--force") & chosen
    markers: dict[str, dict[str, Any]] = {}
    done: set[str] = set()
    running: set[str] = set()
    steps = []
    for s in stages:
        marker = read_marker(root, s.id)
        waiting = [d for d in s.deps if d not in done]
        if waiting:
            reason = f"upstream {waiting[0]} runs"
        elif marker is None:
            reason = "forced" if s.id in forced else _unfinished(root, s, markers)
        elif marker.get("key") != stage_key(s, markers):
            reason = "config or upstream changed"
        elif s.id in forced:
            reason = "forced"
        else:
            _check_outputs(root, s.id, marker)
            done.add(s.id)
            markers[s.id] = marker
            if s.id in chosen:
                steps.append(Step(s, "skip", f"done {marker.get('finished', '')}, key {marker['key'][:10]}"))
            continue
        if s.id not in chosen:
            continue
        missing = [d for d in waiting if d not in running]
        if missing:
            raise StageError(f"--only {s.id}: its input stage(s) {', '.join(missing)} are not done; run the "
                             f"experiment without --only first (or --only {missing[0]})")
        running.add(s.id)
        steps.append(Step(s, "run", reason))
    return steps


def execute(stages: list[Stage], root: Path, force: list[str] | None = None, only: list[str] | None = None,
            log: Callable[[str], None] = print) -> list[Step]:
    """Run the stages that are not done; every finished stage writes its marker last."""
    root = Path(root)
    steps = plan(stages, root, force, only)
    forced = {step.stage.id for step in steps if step.reason == "forced"}
    for step in steps:
        log(f"{step.action:4s} {step.stage.id:24s} {step.reason}")
    for step in steps:  # a stage replaces its folder: never one the study did not write
        d = stage_dir(root, step.stage.id)
        ours = any((d / name).exists() for name in (MARKER, PENDING, OLD_PENDING))
        if step.action != "skip" and (d.is_file() or (d.is_dir() and any(d.iterdir()) and not ours)):
            raise StageError(f"{d}: holds files this study did not write (no {MARKER} or {PENDING}), which stage "
                             f"{step.stage.id} would replace; move them, or choose another --out (a stage an "
                             "older geca left unfinished may have no marker either: delete its folder to redo it)")
    markers = {s.id: m for s in stages if (m := read_marker(root, s.id)) is not None}
    for step in steps:
        if step.action == "skip":
            continue
        s = step.stage
        key = stage_key(s, markers)
        d = stage_dir(root, s.id)
        log(f"── {s.id} ({step.reason})")
        started = time.time()
        if s.resumable:  # works in place, so that an interrupted training resumes
            d = real_dir(d)  # a link to another disk stays a link
            if s.id in forced and d.exists():
                shutil.rmtree(d)  # forced: start afresh
            _prepare_resumable(d, key)
            markers[s.id] = _write_marker(d, s, key, markers, started, s.perform(d))
            (d / PENDING).unlink(missing_ok=True)
        else:  # built beside the old results, which stay until the new ones are whole (a failed redo loses nothing)
            with staged_dir(d) as tmp:
                markers[s.id] = _write_marker(tmp, s, key, markers, started, s.perform(tmp))
        log(f"   {s.id} done in {markers[s.id]['seconds']:.1f} s")
    return steps


def _write_marker(directory: Path, s: Stage, key: str, markers: dict[str, dict[str, Any]], started: float,
                  outputs: dict[str, Any]) -> dict[str, Any]:
    """The done-marker, written last: what ran, from which inputs, where, and what it made."""
    marker = {"stage": s.id, "key": key, "run_id": uuid.uuid4().hex, "params": s.params,
              "deps": {dep: markers[dep]["run_id"] for dep in s.deps},
              "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - started, 2),
              "env": environment(), "outputs": outputs}
    atomic_write_json(directory / MARKER, marker)
    return marker


def _unfinished(root: Path, s: Stage, markers: dict[str, dict[str, Any]]) -> str:
    """Why a stage without a marker runs: never begun, or interrupted (a resumable stage's work, which goes on
    under the same key, as `_prepare_resumable` decides)."""
    d = stage_dir(root, s.id)
    pending = next((_read_own(d / name) for name in (PENDING, OLD_PENDING) if (d / name).exists()), None)
    if pending is None:
        return "not run yet"
    if pending.get("key") == stage_key(s, markers):
        return "interrupted; resumes from its work"
    return "interrupted; starts afresh (config or upstream changed)"


def _prepare_resumable(d: Path, key: str) -> None:
    """Empty the stage's directory, unless it left work there under the same key (then it goes on)."""
    (d / MARKER).unlink(missing_ok=True)
    pending = d / PENDING
    old = d / OLD_PENDING  # of a study begun before the marker was hidden
    if old.exists() and pending.exists():  # a stray visible file would stop the training starting in the folder
        old.unlink()
    elif old.exists():
        os.replace(old, pending)
    if d.exists() and (_read_own(pending) or {}).get("key") != key:
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(pending, {"key": key})


def _check_outputs(root: Path, stage_id: str, marker: dict[str, Any]) -> None:
    """Files a stage recorded with their SHA-256 (`outputs.sha256`, e.g. the folds CSV) must be as it wrote them:
    what depends on them was made from those bytes."""
    recorded = marker.get("outputs", {}).get("sha256", {})
    for name, digest in recorded.items() if isinstance(recorded, dict) else ():
        path = stage_dir(root, stage_id) / name
        if not path.is_file() or file_sha256(path) != digest:
            raise StageError(f"{path}: {'missing' if not path.is_file() else 'changed'} since stage {stage_id} "
                             f"wrote it, and the stages after it were made from it; restore it, or redo {stage_id} "
                             f"and everything after it with --force {stage_id}")

"""Atomic file writes (a crash never leaves a half-written file or directory under the final name) and strict reads
of the JSON files they write."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from geca.errors import ConfigError, GecaError

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def per_file_version(fn: Callable[[Path], T]) -> Callable[[Path], T]:
    """`fn(path)` computed once per version of the file (its resolved path, modification time and size): for
    hashes that take seconds and are asked for once per split, fold or set."""
    @functools.lru_cache(maxsize=16)
    def cached(path: Path, mtime_ns: int, size: int) -> T:
        return fn(path)

    @functools.wraps(fn)
    def by_version(path: Path) -> T:
        stat = Path(path).stat()
        return cached(Path(path).resolve(), stat.st_mtime_ns, stat.st_size)

    return by_version


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str) -> str:
    # MD5 checks a published dataset's integrity only, which FIPS builds allow when said so
    h = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one place, however written (`~`, relative, symlinks)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def same_source(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two dataset specs or folds files name the same data: the same text, the same file or folder however
    the path is written, or files with the same bytes (a copied folds CSV)."""
    if a is None or b is None:
        return False
    if str(a) == str(b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.exists() and pb.exists()):
        return False
    return same_path(pa, pb) or (pa.is_file() and pb.is_file() and file_sha256(pa) == file_sha256(pb))


def unfindable(recorded: str | Path | None, given: str | Path | None) -> bool:
    """Whether `given` cannot be compared with a path `recorded` elsewhere (a run's or a manifest's, relative to where
    it was written): spelt otherwise, and `recorded` is not found from here."""
    return recorded is not None and given is not None and str(given) != str(recorded) and \
        not Path(recorded).expanduser().exists()


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (what tells a killed writer's leftovers from a running writer's work)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_staging(final: Path) -> list[Path]:
    """Delete the staging folders of `final` left by killed processes (their pid, in the name, no longer runs), and
    the work folders a writer kept beside such a staging folder (`..NAME.partial-PID-….unfinished`)."""
    final = Path(final)
    removed = []
    for prefix in (f".{final.name}.partial-", f"..{final.name}.partial-"):
        for p in final.parent.glob(f"{glob.escape(prefix)}*") if final.parent.is_dir() else []:
            pid = p.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or (int(pid) != os.getpid() and not process_alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def real_dir(path: Path) -> Path:
    """The folder a symbolic link names (a link to a bigger disk, say): replacing the link itself would leave the
    new folder where the link was, and the link's own folder untouched."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def staging_dir(final: Path) -> Path:
    """A fresh directory beside `final` to build it in, with the permissions a plain `mkdir` would give; stale
    staging folders of the same target (from killed runs) are removed first.

    `mkdtemp` makes it owner-only (0700), which a later rename would carry over to a run or sample directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Build a directory in a staging folder and swap it in for `final` only when the block ends without error;
    on any error (or interruption) the staging folder is deleted and `final` is left as it was."""
    final = real_dir(final)
    tmp = staging_dir(final)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for work in tmp.parent.glob(f"{glob.escape('.' + tmp.name)}*"):  # what a writer kept beside it
            shutil.rmtree(work, ignore_errors=True)
        raise


def output_file(path: Path, flag: str, suffix: str, overwrite: bool = True,
                own: tuple[str, Callable[[Path], bool]] | None = None) -> Path:
    """`path` checked as a file to write, before any work: not a folder, named `suffix`, under no file, in a
    folder that takes files, (unless `overwrite`) not there yet, and where it is there, the command's own kind of file
    by `own` = (what it is, a test of it): a dataset's CSV or a run's weights are never replaced by a folds file or
    a report."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: a folder; give a {suffix} file name (e.g. {path / ('out' + suffix)})")
    if path.suffix.lower() != suffix:
        raise ConfigError(f"{flag} {path}: expected a {suffix} file name")
    if own is not None and path.exists() and not own[1](path):  # first: --overwrite would not help
        raise ConfigError(f"{flag} {path}: exists and is not {own[0]}, the only file this replaces; choose another "
                          f"{flag}")
    if not overwrite and path.exists():
        raise ConfigError(f"{flag} {path}: exists; pass --overwrite to replace it or choose another {flag}")
    _under_no_file(path.parent, flag, path)
    return path


def has_csv_header(path: Path, columns: Sequence[str]) -> bool:
    """Whether the CSV at `path` starts with exactly these column names (what a command's own CSV is known by)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), None) == list(columns)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def other_files(folder: Path, own: Callable[[Path], bool]) -> list[str]:
    """The names in `folder` that are not its writer's own (`own`), hidden files aside (a file browser's .DS_Store, a
    killed write's temporary); none where there is no folder."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not own(p) and not (p.name.startswith(".") and p.is_file()))


def few(names: list[str]) -> str:
    """The first names of a list, for a message."""
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def output_dir(path: Path, flag: str = "--out") -> Path:
    """`path` checked as a folder to write into, before any work: neither it nor a folder above it is a file."""
    path = Path(path)
    _under_no_file(path, flag, path)
    return path


def _under_no_file(folder: Path, flag: str, path: Path) -> None:
    """Neither `folder` nor one above it is a file, and the nearest that exists takes new files (a read-only folder
    is found now, not after the work, under a temporary name)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # the nearest; the rest are created
    if not existing.is_dir():
        where = "" if existing == path else f" {existing}"
        raise ConfigError(f"{flag} {path}:{where} is a file, not a directory")
    # an existing output folder is written into, or replaced by a sibling built beside it (staged_dir)
    for where in (existing, existing.parent) if existing == path else (existing,):
        try:
            with tempfile.TemporaryFile(dir=where):
                pass
        except OSError as e:
            raise ConfigError(f"{flag} {path}: cannot write in {where} ({e.strerror or e})") from None


def clean_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of `path` that killed writers left (`.NAME.PID-XXXX.tmp` whose pid no longer runs, and
    the pid-less `.NAME.XXXXXXXX.tmp` of writers before the pid was added)."""
    path = Path(path)
    own = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-[a-z0-9_]+|[a-z0-9_]{{8}})\.tmp")
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if path.parent.is_dir() else []:
        m = own.fullmatch(p.name)
        if m is not None and (m[1] is None or (int(m[1]) != os.getpid() and not process_alive(int(m[1])))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def delete_dir(path: Path, trash: Path) -> None:
    """Delete `path` by renaming it to `trash` first: an interruption leaves no half-deleted folder under its name,
    only `trash`, which the caller's next clean-up removes (as a failed deletion here leaves it)."""
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it into place; temporaries that killed
    writers of `path` left are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's (and safetensors') 0600 would otherwise become the file's
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: Path, error: type[GecaError]) -> dict[str, Any]:
    """A JSON file that must hold an object; one that does not, or cannot be read, is `error` naming the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise error(f"{path}: corrupt, not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: corrupt, a JSON {type(obj).__name__} where an object was expected")
    return obj


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a completed directory into place, replacing `final` only once the new one is whole."""
    final = Path(final)
    mode = 0o666 & ~_umask()
    for f in Path(tmp_dir).rglob("*"):  # safetensors writes owner-only files
        if f.is_file():
            f.chmod(mode)
    if not final.exists():
        os.replace(tmp_dir, final)
    elif _exchange(Path(tmp_dir), final):  # one step: `final` is never missing, not even for a moment
        shutil.rmtree(tmp_dir)
    else:
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux's renameat2 with RENAME_EXCHANGE; Python has no call for it); False where
    the system or its file system cannot, and the caller falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows by column name; none where there is no file."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class CsvLog:
    """A CSV file with fixed columns, one row per step: appended as work goes on, cut back on resume."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path = Path(path)
        self.fields = fields

    def rows(self) -> list[dict[str, str]]:
        return csv_rows(self.path)

    def append(self, row: dict[str, object]) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.fields, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def keep_until(self, step: int) -> None:
        """Drop the rows of steps after `step` (the checkpoint a run resumes from), so no step is logged twice."""
        if not self.path.exists():
            return
        try:
            kept = [r for r in self.rows() if int(r["step"]) <= step]
        except (csv.Error, KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise GecaError(f"{self.path}: corrupt log ({type(e).__name__}: {e}); fix or remove it to resume") from None
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, buf.getvalue())

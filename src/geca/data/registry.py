"""One entry point for every dataset: ``load_split(spec, split)``.

A spec is a path to a MedMNIST ``.npz``, a path to a folder + CSV ``.csv``, a MedMNIST dataset name
(``retinamnist``, ...), or a procedural set (``synthetic-fundus``, ``synthetic-oct``) optionally followed by
``@key=value,key=value`` options, e.g. ``synthetic-oct@patients=80,seed=1``.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import os
import zipfile
from pathlib import Path

import numpy as np

from geca.data.folder_csv import load_folder_csv, read_table
from geca.data.folds import fold_split_rows, group_ids, read_folds
from geca.data.imageset import ImageSet
from geca.data.medmnist_npz import KNOWN_DATASETS, data_dirs, find_npz, load_npz
from geca.data.procedural import PROCEDURAL, check_options, resolved_options
from geca.errors import ConfigError, DataError
from geca.utils.io import per_file_version, same_source

SPLITS = ("train", "val", "test", "all")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``name@k=v,k=v`` into the name (or path) and its options.

    Only a tail of ``key=value`` pairs after the last ``@`` counts as options, so a path that merely
    contains ``@`` stays whole.
    """
    spec = spec.strip()
    base, at, tail = spec.rpartition("@")
    if not at or "=" not in tail:
        return spec, {}
    options: dict[str, str] = {}
    for item in tail.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise DataError(f"dataset spec {spec!r}: option {item!r} is not key=value")
        if key in options:
            raise DataError(f"dataset spec {spec!r}: option {key!r} given twice")
        options[key] = value
    return base.strip(), options


def _check_split(split: str, valid: tuple[str, ...], what: str) -> None:
    if split not in valid:
        raise DataError(f"unknown split {split!r} for {what}; valid: {', '.join(valid)}")


def _procedural_kwargs(name: str, options: dict[str, str], image_size: int | None) -> dict[str, int]:
    if name not in PROCEDURAL:
        raise DataError(f"unknown procedural dataset {name!r}; valid: {', '.join(PROCEDURAL)}")
    fn = PROCEDURAL[name]
    params = inspect.signature(fn).parameters.values()
    valid = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    kwargs: dict[str, int] = {}
    for key, value in options.items():
        if key not in valid:
            raise DataError(f"{name}: unknown option {key!r}; valid: {', '.join(valid)}")
        try:
            kwargs[key] = int(value)
        except ValueError as exc:
            raise DataError(f"{name}: option {key!r} must be an integer, got {value!r}") from exc
    if image_size is not None:
        if "size" in kwargs and kwargs["size"] != image_size:
            raise DataError(f"{name}: option size={kwargs['size']} contradicts image_size={image_size}")
        kwargs["size"] = image_size
    return kwargs


def source_key(spec: str) -> str:
    """What names a dataset's images for the leakage checks, however the spec is written: a procedural set's name and
    seed (its other options draw the same first patients or images at another size or count), a folder + CSV set's
    filenames and patient ids (a moved or re-saved CSV is the same set), or an npz's arrays (a copied or re-saved
    npz is the same set; an npz name not found here stands for itself)."""
    kind, name, options = _source(spec)
    if kind == "procedural":
        return f"{name}@seed={resolved_options(name, **_procedural_kwargs(name, options, None))['seed']}"
    path = _npz_file(name) if kind == "npz" else Path(name).expanduser().resolve()
    if path is None:
        return name
    try:
        return (_csv_key if kind == "csv" else _npz_key)(path)
    except OSError as e:  # its stat (reading it is the keys' own DataError)
        raise DataError(f"{path}: {kind} file not readable ({e.strerror})") from None


def canonical_spec(spec: str) -> str:
    """One spelling per dataset spec: a procedural set's options sorted, its defaults written out
    (`synthetic-oct@size=8,patients=9` → `synthetic-oct@patients=9,seed=0,size=8`); a file as `located_spec`."""
    try:
        kind, name, options = _source(spec)
        if kind != "procedural":
            return located_spec(spec)
        given = resolved_options(name, **_procedural_kwargs(name, options, None))
    except (DataError, TypeError):
        return spec
    return f"{name}@" + ",".join(f"{k}={v}" for k, v in sorted(given.items()))


def located_spec(spec: str) -> str:
    """A spec naming a file by a relative path, made absolute (what a run records, so that it resumes and samples
    from any folder); names and procedural sets as given."""
    name, options = parse_spec(spec)
    if options or not is_path(name):  # a name, or a procedural set (never a path: see _source)
        return spec
    return str(Path(name).expanduser().resolve())


@per_file_version  # classify checks every synthetic set of every fold against the same data
def _csv_key(path: Path) -> str:
    """A folder + CSV set's filenames and patient ids, hashed: its table's rows, not their order or line endings."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
            rows = sorted(f"{(r.get('filename') or '').strip()}\t{(r.get('patient_id') or '').strip()}"
                          for r in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable CSV: {e}") from None
    return "csv:" + hashlib.sha256("\n".join(rows).encode()).hexdigest()


@per_file_version
def _npz_key(path: Path) -> str:
    """An npz's arrays (names, dtypes, shapes and values) hashed, not its bytes: compression and member order vary."""
    h = hashlib.sha256()
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not an npz archive")
        with archive:
            for member in sorted(archive.files):
                array = np.ascontiguousarray(archive[member])
                h.update(f"{member}\t{array.dtype.str}\t{array.shape}\n".encode())
                h.update(array.reshape(-1).view(np.uint8))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable npz: {e}") from None
    return "npz:" + h.hexdigest()


def source_files(spec: str) -> list[Path]:
    """The files a dataset spec reads, resolved: an npz, or a CSV and the images its rows name; none for a procedural
    set or an npz name not found here."""
    kind, name, _ = _source(spec)
    if kind == "procedural":
        return []
    if kind == "csv":
        table = read_table(name)
        return [table.csv_path.resolve(), *table.paths]
    path = _npz_file(name)
    return [] if path is None else [path]


def _npz_file(name: str) -> Path | None:
    """The file an npz name or path stands for here, or None where there is none."""
    path = Path(name).expanduser() if is_path(name) else find_npz(name)
    return path.resolve() if path is not None and path.is_file() else None


def same_data(a: str | None, b: str | None, b_key: str | None = None) -> bool:
    """Whether two dataset specs hold the same images, however they are written (`synthetic-oct@size=8,patients=9`
    and `synthetic-oct@patients=9,size=8`; a MedMNIST name and its file; a copied, moved or re-saved CSV). `b_key`
    is b's `source_key` as recorded where b was loaded (a relative path there may not be found from here)."""
    if a is None or (b is None and b_key is None):
        return False
    if b_key is None and b is not None and a.strip() == b.strip():  # a recorded key outranks the text
        return True
    try:
        if source_key(a) == (b_key or source_key(b)):
            return True
        if b_key is not None and Path(b_key).is_absolute() and same_source(_npz_file(parse_spec(a)[0]), b_key):
            return True  # an npz's key as geca recorded it before keys were by content: its path
    except DataError:
        pass  # a spec that names nothing loadable here is compared as written
    return b is not None and same_source(a, b)


def is_path(name: str) -> bool:
    """Whether a spec's name is a file path (an .npz or .csv, or anything with a folder in it) rather than a name."""
    return name.lower().endswith((".npz", ".csv")) or "/" in name or os.sep in name


def _source(spec: str) -> tuple[str, str, dict[str, str]]:
    """(kind, name or path, options) of a spec: kind is procedural, csv or npz; a name that is none is refused."""
    name, options = parse_spec(spec)
    if not name:
        raise DataError(f"empty dataset spec {spec!r}")
    if not is_path(name) and name.startswith("synthetic-"):
        return "procedural", name, options
    if options:
        raise DataError(f"{spec!r}: options after '@' apply only to procedural datasets "
                        "(synthetic-fundus, synthetic-oct); valid here: none")
    if name.lower().endswith(".csv"):
        return "csv", name, options
    if not is_path(name) and name not in KNOWN_DATASETS and find_npz(name) is None:
        raise DataError(
            f"unknown dataset {name!r}: expected a .npz or .csv path, a procedural set (synthetic-fundus, "
            f"synthetic-oct), a MedMNIST name ({', '.join(KNOWN_DATASETS)}), or NAME.npz in "
            f"{', '.join(str(d) for d in data_dirs())}"
        )
    return "npz", name, options


def check_download(spec: str) -> None:
    """--download (data.download) fetches a MedMNIST set named by name; anything else is a config error."""
    kind, name, _ = _source(spec)
    if kind != "npz" or is_path(name):
        what = "a procedural set, drawn here" if kind == "procedural" else "a file path"
        raise ConfigError(f"--download (data.download) fetches a MedMNIST set given by name "
                          f"({', '.join(KNOWN_DATASETS)}); {spec!r} is {what}: there is nothing to fetch")


def check_spec(spec: str, download: bool = False, image_size: int | None = None) -> int | None:
    """Refuse a spec that names nothing loadable (an unknown name or option, a missing file, a CSV without its
    columns, an npz whose arrays or labels are wrong) without decoding a CSV's images or making a procedural set:
    for commands that check everything before they create anything. An npz is read whole (seconds at most).
    Returns the images' side where it is known without decoding (`image_size`, a procedural size, an npz's)."""
    kind, name, options = _source(spec)
    if download:
        check_download(spec)
    if kind == "procedural":
        kwargs = _procedural_kwargs(name, options, image_size)
        check_options(name, **kwargs)
        size = resolved_options(name, **kwargs).get("size")
        return size if isinstance(size, int) else image_size
    if kind == "csv":
        read_table(Path(name).expanduser())
        return image_size
    if download:
        return image_size
    return load_npz(name, "val", image_size=image_size).resolution  # checks every split's arrays and labels


def load_split(
    spec: str,
    split: str,
    *,
    image_size: int | None = None,
    folds_file: str | Path | None = None,
    fold: int = 0,
    download: bool = False,
    cv_val: str = "slice",
) -> ImageSet:
    """Load ``split`` (train, val, test, or all where the source has it) of the dataset named by ``spec``.

    ``image_size`` resizes (or sets the procedural ``size``); ``folds_file`` and ``fold`` pick the splits of
    a folder + CSV set, or of any other source with an ``all`` split (e.g. synthetic-oct), ``cv_val`` how their
    validation split is made (see ``folds.fold_split_rows``); ``download`` fetches a known MedMNIST set that is not
    on disk.
    """
    name, options = parse_spec(spec)
    if folds_file is not None and not name.lower().endswith(".csv"):
        _check_split(split, SPLITS, repr(spec))
        full = load_split(spec, "all", image_size=image_size, download=download)
        folds = read_folds(folds_file, full.ids, full.patient_ids)
        groups, _ = group_ids(full.ids, full.patient_ids, full.eye_ids)
        return full.subset(fold_split_rows(folds, split, fold, folds_file, full.labels, groups, cv_val))
    kind, name, options = _source(spec)
    if download:
        check_download(spec)
    _check_split(split, SPLITS, repr(spec))
    if kind == "procedural":
        # Each generator validates the split itself: whether it offers "all" is its own business.
        return PROCEDURAL[name](split, **_procedural_kwargs(name, options, image_size))
    if kind == "csv":
        return load_folder_csv(
            Path(name).expanduser(), split, image_size=image_size, folds_file=folds_file, fold=fold, cv_val=cv_val
        )
    return load_npz(name, split, image_size=image_size, download=download)

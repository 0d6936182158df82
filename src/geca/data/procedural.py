"""Procedural retinal image sets, made deterministically from a seed at any resolution, with no download.

``synthetic-fundus`` mimics RetinaMNIST (colour fundus photographs, 5 diabetic-retinopathy grades);
``synthetic-oct`` mimics a multi-label OCT B-scan collection with patients, eyes and several scans per eye.
Both draw at a supersampled resolution and box-filter down, so small images are antialiased.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from geca.data.imageset import ImageSet
from geca.errors import DataError
from geca.utils.schema import MAX_IMAGE_SIZE

FUNDUS_CLASSES = [f"grade {g}" for g in range(5)]
OCT_CLASSES = ["Normal", "dAMD", "wAMD", "DR", "CSC", "PED", "MEM", "FLD", "EXU", "CNV", "RVO"]

# RetinaMNIST train-set grade counts; the default split sizes are RetinaMNIST's.
_FUNDUS_COUNTS = np.array([486, 128, 206, 194, 66])
_FUNDUS_SPLITS = {"train": 1080, "val": 120, "test": 400}
# Every default split size is a multiple of this, so shuffling grades inside such windows keeps the
# exact apportioned counts while making the grade order look random.
_GRADE_WINDOW = 40
_OCT_SPLITS = ("train", "val", "test", "all")
MAX_DRAWN = 10**6  # images or patients drawn: a typo beyond it would fill memory before failing

# Separate seed streams per dataset and purpose, so that changing one never shifts another.
_TAG_FUNDUS, _TAG_OCT_POOL, _TAG_OCT_SPLIT, _TAG_OCT_EYE, _TAG_OCT_SCAN = 101, 202, 203, 204, 205


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _supersample(size: int) -> int:
    """Factor that makes small images drawn at ~80 px or more, and never less than 2x."""
    return min(4, max(2, math.ceil(80 / size)))


def _box_down(img: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks of the first two axes (an antialiasing box filter)."""
    # Summing strided slices is several times faster than a mean over axes of a 5-d reshape.
    rows = sum(img[k::factor] for k in range(factor))
    return sum(rows[:, k::factor] for k in range(factor)) / factor**2


def _check_common(name: str, size: int, seed: int) -> None:
    if not 8 <= size <= MAX_IMAGE_SIZE:
        raise DataError(f"{name}: size must be in [8, {MAX_IMAGE_SIZE}], got {size}")
    if seed < 0:
        raise DataError(f"{name}: seed must be non-negative, got {seed}")


def _check_fundus(size: int, n: int | None, seed: int) -> None:
    _check_common("synthetic-fundus", size, seed)
    if n is not None and not 1 <= n <= MAX_DRAWN:
        raise DataError(f"synthetic-fundus: n must be in [1, {MAX_DRAWN}], got {n}")


def _check_oct(size: int, patients: int, seed: int) -> None:
    _check_common("synthetic-oct", size, seed)
    if not 5 <= patients <= MAX_DRAWN:
        raise DataError(f"synthetic-oct: patients must be in [5, {MAX_DRAWN}] (at least one per split and more "
                        f"for training), got {patients}")


# --------------------------------------------------------------------------------------------------------
# Synthetic fundus
# --------------------------------------------------------------------------------------------------------

# Lesion count ranges (inclusive) per grade: microaneurysms, exudate clusters, blot haemorrhages,
# cotton-wool spots, neovascular fronds.
_LESIONS = {
    0: ((0, 0), (0, 0), (0, 0), (0, 0), (0, 0)),
    1: ((2, 6), (0, 0), (0, 0), (0, 0), (0, 0)),
    2: ((5, 12), (1, 3), (0, 2), (0, 0), (0, 0)),
    3: ((8, 18), (2, 4), (4, 9), (2, 4), (0, 0)),
    4: ((10, 22), (2, 5), (5, 11), (2, 5), (2, 4)),
}


def _grade_sequence(seed: int, split: str, n: int) -> np.ndarray:
    """Grades of images 0..n-1: any prefix is close to the RetinaMNIST proportions, and exact at
    multiples of 1080; grade i depends only on (seed, split, i)."""
    weights = _FUNDUS_COUNTS / _FUNDUS_COUNTS.sum()
    total = -(-n // _GRADE_WINDOW) * _GRADE_WINDOW
    counts = np.zeros(len(weights))
    grades = np.empty(total, dtype=np.int64)
    for i in range(total):  # greedy largest deficit keeps every prefix within one image of its quota
        k = int(np.argmax((i + 1) * weights - counts))
        grades[i] = k
        counts[k] += 1
    split_key = list(_FUNDUS_SPLITS).index(split)
    for start in range(0, total, _GRADE_WINDOW):
        window = grades[start:start + _GRADE_WINDOW]
        grades[start:start + _GRADE_WINDOW] = _rng(seed, _TAG_FUNDUS, split_key, 1, start).permutation(window)
    return grades[:n]


def _walks(rng: np.random.Generator, heading: np.ndarray, curvature: np.ndarray, length: np.ndarray,
           step: float, wiggle: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random curves from the origin, all at once, as complex points (m, n): headings turn by
    ``curvature`` per unit length plus noise. Also returns how many leading points lie within ``length``."""
    n = max(2, int(length.max() / step) + 1)
    turn = curvature[:, None] * step + rng.normal(0.0, wiggle, (len(heading), n - 1))
    angle = heading[:, None] + np.cumsum(turn, axis=1)
    z = np.zeros((len(heading), n), dtype=complex)
    np.cumsum(step * np.exp(1j * angle), axis=1, out=z[:, 1:])
    return z, np.minimum(n, (length / step).astype(int) + 1)


def _trunk_table() -> np.ndarray:
    """First-generation vessels in a frame with the disc on the right (temporal = left), one row each:
    heading, its sd, curvature, its sd, length, branching depth, width, darkness."""
    arcades = [(-math.pi / 2 - 0.35, -1.3, 1.5, 2), (math.pi / 2 + 0.35, 1.3, 1.5, 2),  # temporal arcades
               (-math.pi / 2 + 0.6, 0.4, 0.8, 1), (math.pi / 2 - 0.6, -0.4, 0.8, 1)]  # nasal trunks
    rows = [(h + offset, 0.08, c, 0.2, length, depth, width, dark)
            for h, c, length, depth in arcades
            for width, dark, offset in ((0.034, 0.85, 0.12), (0.026, 0.6, -0.12))]  # vein, artery
    rows += [(math.pi, 0.35, 0.0, 1.0, 0.33, 0, 0.016, 0.6)] * 2  # small twigs towards the macula
    return np.array(rows)


_TRUNKS = _trunk_table()


def _vessel_tree(rng: np.random.Generator, disc: complex, disc_r: float, side: float,
                 inside: Callable[[np.ndarray], np.ndarray]) -> list[tuple[np.ndarray, float, float]]:
    """Vessels as (complex points, start width, darkness): artery/vein pairs of two temporal arcades
    curving round the macula and two shorter nasal trunks, branching up to twice, plus two macular twigs.

    The whole topology is drawn first, so every curve comes from one batch of random walks that are then
    rotated onto their parent's branching point; curves are cut where they leave the fundus."""
    heading, heading_sd, curvature, curvature_sd, length, depth, width, dark = _TRUNKS.T
    m = len(heading)
    heading = heading + rng.normal(0, 1, m) * heading_sd
    curvature = curvature + rng.normal(0, 1, m) * curvature_sd
    if side < 0:
        heading, curvature = math.pi - heading, -curvature
    length, width = length * rng.uniform(0.85, 1.1, m), width * rng.uniform(0.9, 1.1, m)
    # Per generation: trunks carry an absolute heading; branches carry their parent, where along it they
    # start (fraction of its length) and their turn away from it.
    gens = [dict(heading=heading, curvature=curvature, length=length, depth=depth, width=width, dark=dark)]
    while (gens[-1]["depth"] > 0).any():
        g = gens[-1]
        kids = rng.integers(0, g["depth"].astype(int) + 2) * (g["depth"] > 0)
        parent = np.repeat(np.arange(len(kids)), kids)
        k = len(parent)
        frac = rng.uniform(0.2, 0.95, k)
        gens.append(dict(
            parent=parent, frac=frac, turn=(2 * rng.integers(0, 2, k) - 1) * rng.uniform(0.4, 1.0, k),
            curvature=rng.normal(0, 1.0, k), length=g["length"][parent] * rng.uniform(0.3, 0.55, k),
            depth=g["depth"][parent] - 1, width=g["width"][parent] * (1 - 0.6 * frac) * 0.7,
            dark=g["dark"][parent]))
    sizes = np.cumsum([0] + [len(g["depth"]) for g in gens])
    cat = {key: np.concatenate([g[key] for g in gens]) for key in ("curvature", "length", "width", "dark")}
    rel, n = _walks(rng, np.zeros(sizes[-1]), cat["curvature"], cat["length"], 0.025, 0.05)

    # Trunks emerge from the cup, part-way out from the disc centre; children start on their parent and
    # turn away from the parent's local direction.
    z = np.empty_like(rel)
    rot = np.exp(1j * gens[0]["heading"])
    z[:sizes[1]] = disc + 0.35 * disc_r * rot[:, None] + rel[:sizes[1]] * rot[:, None]
    for i, g in enumerate(gens[1:], start=1):
        pz, pn = z[sizes[i - 1]:sizes[i]][g["parent"]], n[sizes[i - 1]:sizes[i]][g["parent"]]
        at = np.clip((g["frac"] * pn).astype(int), 1, pn - 2)
        rows = np.arange(len(at))
        direction = pz[rows, at + 1] - pz[rows, at - 1]
        rot = direction / np.maximum(np.abs(direction), 1e-9) * np.exp(1j * g["turn"])
        z[sizes[i]:sizes[i + 1]] = pz[rows, at][:, None] + rel[sizes[i]:sizes[i + 1]] * rot[:, None]
    ok = inside(z)
    n = np.minimum(n, np.where(ok.all(axis=1), z.shape[1], np.argmin(ok, axis=1)))
    return [(z[i, :n[i]], float(cat["width"][i]), float(cat["dark"][i])) for i in range(len(n)) if n[i] >= 2]


def _lesion_sites(rng: np.random.Generator, k: int, centre: np.ndarray, spread: float,
                  allowed: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Up to ``k`` points around ``centre`` that ``allowed`` accepts (rejection sampling)."""
    if k == 0:
        return np.zeros((0, 2))
    cand = centre + rng.normal(0.0, spread, (4 * k + 8, 2))
    return cand[allowed(cand)][:k]


def _blobs(rng: np.random.Generator, centres: np.ndarray, radii: np.ndarray, irregular: float) -> list[list]:
    """Flat pixel-coordinate polygons of irregular, slightly elongated blobs."""
    k = len(centres)
    angles = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    r = radii[:, None] * (1 + irregular * rng.uniform(-1, 1, (k, 12)))
    stretch, tilt = rng.uniform(1.0, 1.6, (k, 1)), rng.uniform(0, math.pi, (k, 1))
    z = (r * np.cos(angles) * stretch + 1j * r * np.sin(angles)) * np.exp(1j * tilt)
    pts = np.stack([centres[:, :1] + z.real, centres[:, 1:] + z.imag], axis=-1)
    return [poly.ravel().tolist() for poly in pts]


def _fundus_image(grade: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 fundus photograph of the given DR grade."""
    ss = _supersample(size)
    s = size * ss
    u = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1

    def px(p: np.ndarray) -> np.ndarray:  # normalised [-1, 1] coordinates -> supersampled pixels
        return (p + 1) / 2 * s

    def zpx(z: np.ndarray) -> np.ndarray:  # complex normalised points -> flat pixel list for PIL
        return px(np.stack([z.real, z.imag], axis=-1)).ravel()

    def rad(r: float, floor_px: float) -> float:  # radius in pixels, never below floor_px output pixels
        return max(r * s / 2, floor_px * ss)

    side = 1.0 if rng.random() < 0.5 else -1.0
    centre = rng.normal(0, 0.015, 2)
    radius = rng.uniform(0.9, 0.97)
    disc = centre + np.array([side * rng.uniform(0.38, 0.48), rng.normal(0, 0.05)])
    disc_r = rng.uniform(0.10, 0.13)
    macula = disc + np.array([-side * rng.uniform(0.45, 0.55), rng.normal(0.03, 0.02)])

    # Background: orange-red, pigmentation varies per image, radial vignetting, faint choroidal mottling and a
    # darker macula. All of it is smooth, so it is computed at the output size and broadcast over each
    # supersampled block, which costs nothing visible and saves most of the work.
    v = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = v[None, :], v[:, None]
    base = np.array([0.82, 0.33, 0.13]) * rng.uniform(0.8, 1.1) + rng.normal(0, [0.04, 0.03, 0.02])
    shade = 1 - 0.55 * (np.hypot(x - centre[0], y - centre[1]) / radius) ** 2.5
    freq, phase = rng.normal(0, 3.0, (4, 2)), rng.uniform(0, 2 * math.pi, 4)
    for (fx, fy), p in zip(freq, phase, strict=True):
        shade = shade * (1 + 0.03 * np.cos(math.pi * (fx * x + fy * y) + p))
    shade = shade * (1 - 0.4 * np.exp(-((x - macula[0]) ** 2 + (y - macula[1]) ** 2) / 0.17 ** 2))
    img = np.empty((size, ss, size, ss, 3), dtype=np.float32)
    img[...] = (shade[:, :, None] * base.astype(np.float32))[:, None, :, None]
    img = img.reshape(s, s, 3)

    # Optic disc (nasal side, as in a left or right eye) with a paler cup, drawn only in its bounding box.
    b0 = np.clip(px(disc - 1.25 * disc_r).astype(int), 0, s)
    b1 = np.clip(px(disc + 1.25 * disc_r).astype(int) + 1, 0, s)
    d = np.hypot((u[None, b0[0]:b1[0]] - disc[0]) / disc_r, (u[b0[1]:b1[1], None] - disc[1]) / (1.1 * disc_r))
    view = img[b0[1]:b1[1], b0[0]:b1[0]]
    for colour, edge in (((0.98, 0.78, 0.45), 1.0), ((1.0, 0.9, 0.68), 0.5)):
        w = np.clip((edge - d) / 0.25, 0, 1)[..., None]
        view += (np.array(colour, dtype=np.float32) - view) * w

    def inside(z: np.ndarray) -> np.ndarray:
        return np.abs(z - complex(*centre)) < radius - 0.03

    def lesion_ok(p: np.ndarray) -> np.ndarray:
        far = np.hypot(p[:, 0] - disc[0], p[:, 1] - disc[1]) > 1.3 * disc_r
        return far & (np.hypot(p[:, 0] - centre[0], p[:, 1] - centre[1]) < 0.85 * radius)

    # Shapes are rasterised by PIL at the supersampled size (fast C code); colours are mixed in numpy.
    vessel_layer, red_layer = Image.new("L", (s, s)), Image.new("L", (s, s))
    yellow_layer, wool_layer = Image.new("L", (s, s)), Image.new("L", (s, s))
    vessels, red = ImageDraw.Draw(vessel_layer), ImageDraw.Draw(red_layer)
    yellow, wool = ImageDraw.Draw(yellow_layer), ImageDraw.Draw(wool_layer)

    # Arteries first, so veins (drawn later, darker) win where they cross.
    tree = _vessel_tree(rng, complex(*disc), disc_r, side, inside)
    for pts, width, dark in sorted(tree, key=lambda t: t[2]):
        p = zpx(pts).reshape(-1, 2)
        # Taper in chunks; a vessel under 1.5 px wide is one faint line (most of them at small sizes).
        step = 8 if width * s / 2 > 1.5 else len(p)
        for a in range(0, len(p) - 1, step):
            w = rad(width * (1 - 0.65 * (a + step / 2) / len(p)) / 2, 0.25) * 2
            # PIL widths are whole pixels: thin vessels get a fainter line to keep their visual weight.
            line_w = max(1, round(w))
            vessels.line(p[a:a + step + 1].ravel().tolist(), fill=int(255 * dark * min(1.0, w / line_w)),
                         width=line_w, joint="curve")

    def radii(k: int, lo: float, hi: float, floor_px: float) -> np.ndarray:
        return np.maximum(rng.uniform(lo, hi, k) * s / 2, floor_px * ss)

    def dots(draw: ImageDraw.ImageDraw, sites: np.ndarray, r: np.ndarray, fill_lo: int) -> None:
        fills = rng.integers(fill_lo, 256, len(sites)).tolist()
        for (qx, qy), rr, f in zip(px(sites).tolist(), r.tolist(), fills, strict=True):
            draw.ellipse([qx - rr, qy - rr, qx + rr, qy + rr], fill=f)

    n_ma, n_ex, n_haem, n_wool, n_nv = (int(rng.integers(lo, hi + 1)) for lo, hi in _LESIONS[grade])
    sites = _lesion_sites(rng, n_ma, macula, 0.35, lesion_ok)  # microaneurysms
    dots(red, sites, radii(len(sites), 0.012, 0.018, 0.55), 255)
    sites = _lesion_sites(rng, n_haem, macula, 0.4, lesion_ok)  # blot haemorrhages
    for poly in _blobs(rng, px(sites), radii(len(sites), 0.03, 0.055, 0.8), 0.3):
        red.polygon(poly, fill=int(rng.integers(200, 256)))
    clusters = _lesion_sites(rng, n_ex, macula, 0.25, lesion_ok)  # hard exudates come in clusters
    spots = np.repeat(clusters, rng.integers(3, 9, len(clusters)), axis=0)
    spots = spots + rng.normal(0, 0.05, spots.shape)
    spots = spots[lesion_ok(spots)]
    dots(yellow, spots, radii(len(spots), 0.01, 0.02, 0.45), 200)
    sites = _lesion_sites(rng, n_wool, macula, 0.3, lesion_ok)  # cotton-wool spots
    for poly in _blobs(rng, px(sites), radii(len(sites), 0.04, 0.065, 0.9), 0.2):
        wool.polygon(poly, fill=220)
    if n_nv:  # neovascularisation: fine tortuous fronds sprouting from the disc rim
        a = rng.uniform(0, 2 * math.pi, n_nv)
        fronds, n = _walks(rng, a + rng.normal(0, 0.5, n_nv), np.zeros(n_nv), rng.uniform(0.2, 0.35, n_nv),
                           0.01, 0.6)
        fronds += complex(*disc) + 1.05 * disc_r * np.exp(1j * a)[:, None]
        w = rad(0.004, 0.2) * 2
        for frond, k in zip(fronds, n, strict=True):
            red.line(zpx(frond[:k]).tolist(), fill=int(230 * min(1.0, w)), width=1, joint="curve")
    # Blur rounds off the polygon corners of haemorrhages and makes cotton-wool spots fluffy.
    if grade >= 2:
        red_layer = red_layer.filter(ImageFilter.GaussianBlur(rad(0.004, 0.3)))
    if n_wool:
        wool_layer = wool_layer.filter(ImageFilter.GaussianBlur(rad(0.02, 0.4)))

    # Tinted layers darken (vessels, red lesions); painted layers cover (exudates, cotton wool).
    for layer, colour, tinted in ((vessel_layer, (0.55, 0.3, 0.4), True),
                                  (red_layer, (0.5, 0.14, 0.15), True),
                                  (yellow_layer, (1.0, 0.88, 0.3), False),
                                  (wool_layer, (0.96, 0.9, 0.8), False)):
        box = layer.getbbox()
        if box is None:
            continue
        m = np.asarray(layer.crop(box), dtype=np.float32)[..., None] / 255
        view = img[box[1]:box[3], box[0]:box[2]]
        if tinted:
            view *= 1 - m * (1 - np.array(colour, dtype=np.float32))
        else:
            view += (np.array(colour, dtype=np.float32) - view) * m
    rim = np.clip((radius - np.hypot(u[None, :] - centre[0], u[:, None] - centre[1])) * s / 2 + 0.5, 0, 1)
    img *= rim[..., None]  # black outside the fundus, antialiased edge

    out = _box_down(img, ss) + rng.normal(0, 0.006, (size, size, 3))
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def synthetic_fundus(split: str, *, size: int = 28, n: int | None = None, seed: int = 0) -> ImageSet:
    """RetinaMNIST-like colour fundus photographs with 5 DR grades (one-hot, multi-class).

    ``n`` images (default 1080/120/400 for train/val/test) with RetinaMNIST's grade prevalence; image i
    depends only on (seed, split, i).
    """
    name = "synthetic-fundus"
    if split == "all":
        raise DataError(f"{name} has no split 'all' (valid: {', '.join(_FUNDUS_SPLITS)}), the one cross-validation "
                        "folds are made from: it has no patients; a folder+CSV dataset or synthetic-oct has it")
    if split not in _FUNDUS_SPLITS:
        raise DataError(f"{name}: unknown split {split!r}; valid: {', '.join(_FUNDUS_SPLITS)}")
    _check_fundus(size, n, seed)
    if n is None:
        n = _FUNDUS_SPLITS[split]
    grades = _grade_sequence(seed, split, n)
    split_key = list(_FUNDUS_SPLITS).index(split)
    images = np.stack([_fundus_image(int(g), size, _rng(seed, _TAG_FUNDUS, split_key, 0, i))
                       for i, g in enumerate(grades)])
    return ImageSet(
        images=images,
        labels=np.eye(len(FUNDUS_CLASSES), dtype=np.float32)[grades],
        class_names=list(FUNDUS_CLASSES),
        multilabel=False,
        source=name,
        ids=[f"{split}-{i:05d}" for i in range(n)],
    )


# --------------------------------------------------------------------------------------------------------
# Synthetic OCT
# --------------------------------------------------------------------------------------------------------

# Each abnormal eye gets one primary diagnosis, then co-occurring findings with these probabilities; the
# numbers are tuned so that the expected scan prevalence matches the in-house counts (out of 1435 scans):
# Normal 278, dAMD 160, wAMD 145, DR 502, CSC 95, PED 133, MEM 196, FLD 613, EXU 573, CNV 138, RVO 34.
_PRIMARY = {"Normal": 0.194, "DR": 0.35, "dAMD": 0.10, "wAMD": 0.10, "CSC": 0.066, "RVO": 0.024,
            "MEM": 0.07, "other": 0.096}
_FINDINGS = {
    "Normal": {},
    "DR": {"FLD": 0.65, "EXU": 0.8, "MEM": 0.14, "dAMD": 0.03},
    "dAMD": {"PED": 0.3, "EXU": 0.15, "FLD": 0.05, "MEM": 0.1},
    "wAMD": {"CNV": 0.7, "FLD": 0.7, "PED": 0.35, "EXU": 0.35, "MEM": 0.05},
    "CSC": {"FLD": 0.5, "PED": 0.3},
    "RVO": {"FLD": 0.85, "EXU": 0.4, "MEM": 0.2},
    "MEM": {"FLD": 0.2},
    "other": {"FLD": 0.6, "EXU": 0.6, "PED": 0.1, "CNV": 0.3},
}


def _eye_labels(rng: np.random.Generator, primary: str) -> np.ndarray:
    """Boolean label vector of one eye with the given primary diagnosis."""
    labels = np.zeros(len(OCT_CLASSES), dtype=bool)
    if primary != "other":
        labels[OCT_CLASSES.index(primary)] = True
    for finding, p in _FINDINGS[primary].items():
        labels[OCT_CLASSES.index(finding)] |= bool(rng.random() < p)
    if not labels.any():  # an "other" eye with nothing drawn still has some fluid or exudate
        labels[OCT_CLASSES.index(str(rng.choice(["FLD", "EXU"])))] = True
    return labels


def _oct_pool(seed: int, patients: int) -> list[tuple[int, str, int, np.ndarray]]:
    """(patient, eye, number of scans, labels) per eye. Draws go patient by patient, so patient p's
    eyes do not depend on how many patients follow."""
    rng = _rng(seed, _TAG_OCT_POOL)
    names, probs = list(_PRIMARY), np.array(list(_PRIMARY.values()))
    pool = []
    for p in range(patients):
        eyes = ["OD", "OS"] if rng.random() < 0.75 else [str(rng.choice(["OD", "OS"]))]
        first = str(rng.choice(names, p=probs / probs.sum()))
        for k, eye in enumerate(eyes):
            # Disease is often bilateral: the second eye shares the first's diagnosis half the time.
            primary = first if k == 0 or rng.random() < 0.5 else str(rng.choice(names, p=probs / probs.sum()))
            pool.append((p, eye, int(rng.integers(1, 8)), _eye_labels(rng, primary)))
    return pool


def _oct_split_of(seed: int, patients: int) -> np.ndarray:
    """Split name per patient: ~70 % train, ~10 % val, ~20 % test, at least one patient in each."""
    n_val, n_test = max(1, round(0.1 * patients)), max(1, round(0.2 * patients))
    order = _rng(seed, _TAG_OCT_SPLIT).permutation(patients)
    split_of = np.full(patients, "train", dtype=object)
    split_of[order[:n_val]] = "val"
    split_of[order[n_val:n_val + n_test]] = "test"
    return split_of


def _bump(x: np.ndarray, centre: float, width: float, height: float) -> np.ndarray:
    return height * np.exp(-((x - centre) / width) ** 2)


def _dome(x: np.ndarray, centre: float, width: float, height: float) -> np.ndarray:
    return height * np.sqrt(np.clip(1 - ((x - centre) / width) ** 2, 0, None))


def _oct_image(labels: np.ndarray, size: int, eye: np.random.Generator,
               scan: np.random.Generator) -> np.ndarray:
    """One (size, size, 1) uint8 B-scan. ``eye`` draws the anatomy and lesion sites shared by all scans of
    the eye (it is freshly seeded per call, so draw order matters); ``scan`` draws what varies per scan."""
    has = {c: bool(v) for c, v in zip(OCT_CLASSES, labels, strict=True)}
    ss = 2  # band edges are antialiased analytically in depth (linear ramps), so 2x is enough
    s = size * ss
    x = (np.arange(s) + 0.5) / s
    y = x[:, None]

    # Eye-level anatomy, in image-height units (depth grows downwards).
    scale = eye.uniform(1.0, 1.25)
    bruch0, tilt, bow = eye.uniform(0.6, 0.68), eye.normal(0, 0.05), eye.uniform(0.02, 0.08)
    fovea_x, dip_depth = eye.uniform(0.42, 0.58), eye.uniform(0.75, 0.92)
    nasal = eye.choice([-1.0, 1.0])
    site = eye.uniform(0.3, 0.7, 8)  # lesion centres, reused by every scan of the eye
    # Scan-level: where the B-scan cuts the volume decides how deep the foveal pit is.
    z = scan.uniform(-1, 1)
    visible = {c: has[c] and (c in ("DR", "RVO") or scan.random() < 0.85) for c in OCT_CLASSES}

    def jitter(i: int) -> float:
        return site[i] + scan.normal(0, 0.03)

    bruch = bruch0 + tilt * (x - 0.5) - bow * ((x - 0.5) * 2) ** 2
    dip = dip_depth * np.exp(-(z / 0.45) ** 2) * np.exp(-((x - fovea_x) / 0.09) ** 2)
    thick = np.ones(s)
    if visible["DR"]:
        thick += _bump(x, jitter(0), 0.3, scan.uniform(0.15, 0.35))
        dip *= 0.6
    if visible["RVO"]:
        thick += scan.uniform(0.3, 0.6) / (1 + np.exp(-(x - jitter(1)) * nasal / 0.06))
        dip *= 0.5

    sub_rpe_material, sub_rpe_serous, srf, cnv, onl_swell = (np.zeros(s) for _ in range(5))
    if visible["dAMD"]:
        for _ in range(int(scan.integers(3, 8))):
            sub_rpe_material += _bump(x, site[2] + scan.normal(0, 0.12), scan.uniform(0.015, 0.035),
                                      scan.uniform(0.015, 0.04))
    if visible["PED"]:
        sub_rpe_serous += _dome(x, jitter(3), scan.uniform(0.06, 0.12), scan.uniform(0.05, 0.09))
    if visible["wAMD"]:  # irregular fibrovascular elevation with a shallow pocket of fluid over it
        c = jitter(4)
        rough = 1 + 0.15 * np.sin(x * scan.uniform(60, 120) + scan.uniform(0, 6))
        sub_rpe_material += _bump(x, c, scan.uniform(0.05, 0.08), scan.uniform(0.03, 0.055)) * rough
        srf += _dome(x, c + scan.normal(0, 0.03), scan.uniform(0.1, 0.18), scan.uniform(0.02, 0.035))
    if visible["CSC"]:
        srf += _dome(x, jitter(5), scan.uniform(0.1, 0.2), scan.uniform(0.05, 0.1))
    if visible["CNV"]:
        cnv += _dome(x, jitter(6), scan.uniform(0.05, 0.1), scan.uniform(0.04, 0.08))
    cysts = []
    if visible["FLD"]:
        for _ in range(int(scan.integers(2, 6))):
            cx, a, b = site[7] + scan.normal(0, 0.1), scan.uniform(0.02, 0.05), scan.uniform(0.015, 0.035)
            cysts.append((cx, a, b, scan.random()))
            onl_swell += _bump(x, cx, 2.5 * a, 1.5 * b)  # the cysts swell the retina smoothly
    wrinkle = 0.0
    if visible["MEM"]:
        wrinkle = 0.008 * np.sin(2 * math.pi * (scan.uniform(10, 20) * x + scan.uniform(0, 1)))

    # Band thicknesses bottom-up from Bruch's membrane; inner layers thin out in the foveal pit.
    inner = (1 - dip) * thick * scale
    rnfl = (0.02 + 0.04 * np.clip(0.5 + nasal * (x - fovea_x), 0, 1)) * inner + wrinkle
    thickness = [
        np.clip(rnfl, 0, None), 0.035 * inner, 0.03 * inner, 0.03 * inner, 0.022 * inner,  # RNFL .. OPL
        0.075 * thick * scale * (1 + 0.3 * dip) + onl_swell,  # ONL
        np.full(s, 0.012), np.full(s, 0.014), srf, cnv, np.full(s, 0.022),  # EZ, OS, SRF, CNV, RPE
        sub_rpe_material, sub_rpe_serous,
    ]
    tops = [bruch - np.sum(thickness[i:], axis=0) for i in range(len(thickness))]
    tops += [bruch, bruch + scale * eye.uniform(0.08, 0.12)]  # choroid, sclera
    levels = [0.03, 0.8, 0.42, 0.55, 0.22, 0.52, 0.14, 0.78, 0.32, 0.03, 0.85, 0.95, 0.5, 0.07, 0.55, 0.08]
    if visible["RVO"]:  # acute vein occlusion makes the swollen inner retina hyper-reflective
        boost = 0.12 / (1 + np.exp(-(x - site[1]) * nasal / 0.06))
        levels[1:6] = [lv + boost for lv in levels[1:6]]

    # Each band edge is a one-pixel linear ramp: an exact box-filtered step, so edges stay antialiased.
    img = np.full((s, s), levels[0])
    for top, below, above in zip(tops, levels[1:], levels[:-1], strict=True):
        img = img + (np.asarray(below) - np.asarray(above)) * np.clip((y - top) * s + 0.5, 0, 1)

    # Choroid: large dark vessel lumens, dimmer with depth; only its rows are touched.
    r0, r1 = int(bruch.min() * s), min(s, int(tops[-1].max() * s) + 2)
    depth = y[r0:r1] - bruch
    waves = scan.normal(0, 1, (2, 2)) * [18, 30] + [6, 10]
    lumen = sum(np.cos(2 * math.pi * fx * x + scan.uniform(0, 2 * math.pi)) * np.cos(2 * math.pi * fy * depth)
                for fx, fy in waves)
    choroid = (depth > 0) & (y[r0:r1] < tops[-1])
    img[r0:r1] *= np.where(choroid, (0.8 + 0.15 * lumen) * np.exp(-depth / 0.12), 1)

    soft = 1.0 / s
    for cx, a, b, t in cysts:  # dark intraretinal cysts, from the inner nuclear into the outer nuclear layer
        col = int(np.clip(cx * s, 0, s - 1))
        inl, onl = (tops[3][col] + tops[4][col]) / 2, (tops[5][col] + tops[6][col]) / 2
        cy = inl + t * (onl - inl)
        d = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
        img *= 1 - 0.9 * np.clip((1 - d) * min(a, b) / soft, 0, 1)
    if visible["EXU"]:  # hyper-reflective dots in the outer plexiform / outer nuclear layers
        for _ in range(int(scan.integers(4, 12))):
            cx = site[7] + scan.normal(0, 0.15)
            col = int(np.clip(cx * s, 0, s - 1))
            cy = scan.uniform(tops[4][col], tops[6][col])
            r = max(scan.uniform(0.008, 0.014), 0.6 / size)
            img = np.maximum(img, np.clip((r - np.hypot(x - cx, y - cy)) / soft, 0, 1))
    if visible["MEM"]:  # epiretinal membrane: a bright line lifting off the wrinkled inner surface
        gap = 0.005 + 0.012 * np.abs(np.sin(2 * math.pi * (scan.uniform(2, 4) * x + scan.uniform(0, 1))))
        width = max(0.004, 0.5 / size)
        img = np.maximum(img, np.exp(-((y - (tops[0] - gap)) / width) ** 2))

    out = _box_down(img, ss) * scan.uniform(0.85, 1.15)
    # Speckle: multiplicative, and correlated along the scan direction like real A-scan neighbours.
    speckle = scan.gamma(3.0, 1 / 3, (size, size + 1))
    out = out * (speckle[:, 1:] + speckle[:, :-1]) / 2 + scan.normal(0, 0.01, out.shape)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)[..., None]


def synthetic_oct(split: str, *, size: int = 32, patients: int = 200, seed: int = 0) -> ImageSet:
    """Multi-label grey OCT B-scans of ``patients`` patients (1-2 eyes each, 1-7 scans per eye).

    Splits are by patient (train ~70 %, val ~10 %, test ~20 %; ``all`` = every scan); labels belong to the
    eye; a scan depends only on (seed, scan id).
    """
    name = "synthetic-oct"
    if split not in _OCT_SPLITS:
        raise DataError(f"{name}: unknown split {split!r}; valid: {', '.join(_OCT_SPLITS)}")
    _check_oct(size, patients, seed)
    split_of = _oct_split_of(seed, patients)
    digits = max(4, len(str(patients - 1)))
    images, labels, ids, patient_ids, eye_ids = [], [], [], [], []
    for p, eye, n_scans, eye_labels in _oct_pool(seed, patients):
        if split != "all" and split_of[p] != split:
            continue
        e = 0 if eye == "OD" else 1
        for k in range(n_scans):
            scan = _rng(seed, _TAG_OCT_SCAN, p, e, k)
            images.append(_oct_image(eye_labels, size, _rng(seed, _TAG_OCT_EYE, p, e), scan))
            labels.append(eye_labels)
            patient_ids.append(f"p{p:0{digits}d}")
            eye_ids.append(f"p{p:0{digits}d}-{eye}")
            ids.append(f"p{p:0{digits}d}-{eye}-s{k}")
    return ImageSet(
        images=np.stack(images),
        labels=np.array(labels, dtype=np.float32),
        class_names=list(OCT_CLASSES),
        multilabel=True,
        source=name,
        ids=ids,
        patient_ids=np.array(patient_ids),
        eye_ids=np.array(eye_ids),
    )


PROCEDURAL: dict[str, Callable[..., ImageSet]] = {
    "synthetic-fundus": synthetic_fundus,
    "synthetic-oct": synthetic_oct,
}
_CHECKS: dict[str, Callable[..., None]] = {"synthetic-fundus": _check_fundus, "synthetic-oct": _check_oct}


def resolved_options(name: str, **options: int) -> dict[str, int | None]:
    """A generator's options with its own defaults filled in (size, n or patients, seed); an unknown one is a
    TypeError."""
    bound = inspect.signature(PROCEDURAL[name]).bind("train", **options)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "split"}


def check_options(name: str, **options: int) -> None:
    """A generator's own range checks on its options (its defaults filled in), without drawing an image: for commands
    that check everything before they create anything."""
    check = _CHECKS[name]
    checked = inspect.signature(check).parameters
    check(**{k: v for k, v in resolved_options(name, **options).items() if k in checked})

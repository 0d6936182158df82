"""``synthetic-fundus``: RetinaMNIST-like colour fundus photographs with 5 diabetic-retinopathy grades."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from geca.data.imageset import ImageSet
from geca.data.procedural.drawing import MAX_DRAWN, box_down, check_common, rng_for, supersample
from geca.errors import DataError

FUNDUS_CLASSES = [f"grade {g}" for g in range(5)]
# RetinaMNIST train-set grade counts; the default split sizes are RetinaMNIST's.
_FUNDUS_COUNTS = np.array([486, 128, 206, 194, 66])
_FUNDUS_SPLITS = {"train": 1080, "val": 120, "test": 400}
# Every default split size is a multiple of this, so shuffling grades inside such windows keeps the
# exact apportioned counts while making the grade order look random.
_GRADE_WINDOW = 40
_TAG_FUNDUS = 101  # its seed stream (synthetic-oct's are others): changing one never shifts another


def check_fundus(size: int, n: int | None, seed: int) -> None:
    check_common("synthetic-fundus", size, seed)
    if n is not None and not 1 <= n <= MAX_DRAWN:
        raise DataError(f"synthetic-fundus: n must be in [1, {MAX_DRAWN}], got {n}")


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
        grades[start:start + _GRADE_WINDOW] = rng_for(seed, _TAG_FUNDUS, split_key, 1, start).permutation(window)
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
    ss = supersample(size)
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

    out = box_down(img, ss) + rng.normal(0, 0.006, (size, size, 3))
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
    check_fundus(size, n, seed)
    if n is None:
        n = _FUNDUS_SPLITS[split]
    grades = _grade_sequence(seed, split, n)
    split_key = list(_FUNDUS_SPLITS).index(split)
    images = np.stack([_fundus_image(int(g), size, rng_for(seed, _TAG_FUNDUS, split_key, 0, i))
                       for i, g in enumerate(grades)])
    return ImageSet(
        images=images,
        labels=np.eye(len(FUNDUS_CLASSES), dtype=np.float32)[grades],
        class_names=list(FUNDUS_CLASSES),
        multilabel=False,
        source=name,
        ids=[f"{split}-{i:05d}" for i in range(n)],
    )

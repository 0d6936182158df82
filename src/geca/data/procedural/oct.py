"""``synthetic-oct``: multi-label grey OCT B-scans with patients, eyes and several scans per eye."""

from __future__ import annotations

import math

import numpy as np

from geca.data.imageset import ImageSet
from geca.data.procedural.drawing import MAX_DRAWN, box_down, check_common, rng_for
from geca.errors import DataError

OCT_CLASSES = ["Normal", "dAMD", "wAMD", "DR", "CSC", "PED", "MEM", "FLD", "EXU", "CNV", "RVO"]
_OCT_SPLITS = ("train", "val", "test", "all")
# its seed streams, one per purpose (synthetic-fundus's is another): changing one never shifts another
_TAG_OCT_POOL, _TAG_OCT_SPLIT, _TAG_OCT_EYE, _TAG_OCT_SCAN = 202, 203, 204, 205


def check_oct(size: int, patients: int, seed: int) -> None:
    check_common("synthetic-oct", size, seed)
    if not 5 <= patients <= MAX_DRAWN:
        raise DataError(f"synthetic-oct: patients must be in [5, {MAX_DRAWN}] (at least one per split and more "
                        f"for training), got {patients}")


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
    rng = rng_for(seed, _TAG_OCT_POOL)
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
    order = rng_for(seed, _TAG_OCT_SPLIT).permutation(patients)
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

    out = box_down(img, ss) * scan.uniform(0.85, 1.15)
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
    check_oct(size, patients, seed)
    split_of = _oct_split_of(seed, patients)
    digits = max(4, len(str(patients - 1)))
    images, labels, ids, patient_ids, eye_ids = [], [], [], [], []
    for p, eye, n_scans, eye_labels in _oct_pool(seed, patients):
        if split != "all" and split_of[p] != split:
            continue
        e = 0 if eye == "OD" else 1
        for k in range(n_scans):
            scan = rng_for(seed, _TAG_OCT_SCAN, p, e, k)
            images.append(_oct_image(eye_labels, size, rng_for(seed, _TAG_OCT_EYE, p, e), scan))
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

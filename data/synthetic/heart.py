"""Cardiac MRI phantom with the left atrium labelled, written as a Task02_Heart-like MSD folder.

Each case is a balanced steady-state free precession (bSSFP) volume of the chest: every blood pool is
bright (left and right ventricles, right atrium, aorta, pulmonary veins and the left atrium, so
brightness alone does not find the atrium: its place behind the ventricles and its veins do), the
myocardium and muscle are grey, fat is bright, the lungs and air are dark. Intensities are arbitrary
scanner units with a per-case gain, a smooth multiplicative coil bias field and Rician noise, as MRI
has no absolute scale. Spacing is anisotropic (thicker slices than pixels) and varies per case.

    from data.synthetic.heart import ensure_heart_phantom
    root = ensure_heart_phantom(".cache/synthetic", num_cases=16, matrix=96)

Patient coordinates while drawing, in millimetres: X towards the patient's left, Y towards the back,
Z towards the head, origin at the heart. The grid is indexed (i, j, k) = (X, Y, Z), an axial stack,
whose NIfTI affine is diag(-sx, -sy, sz) in RAS+.
"""

from pathlib import Path

import numpy as np

from data.synthetic.msd_layout import ensure_dataset, write_msd_dataset
from data.synthetic.shapes import Grid, paint_ellipsoid, paint_tube, smooth_field

GENERATOR_VERSION = 1  # bump when the drawn anatomy changes, so cached phantoms are regenerated
LABELS = {0: "background", 1: "left atrium"}
FIELD_OF_VIEW_MM = (200.0, 200.0)  # in-plane (X, Y), like a cardiac MRI centred on the heart
EXTENT_Z_MM = 110.0  # head-foot coverage, atria to apex

# Tissue codes, each with a mean bSSFP signal (arbitrary units before the per-case gain).
AIR, FAT, MUSCLE, LUNG, BONE, MARROW, MYOCARDIUM, BLOOD, LEFT_ATRIUM = range(9)
SIGNAL = np.array([5.0, 320.0, 110.0, 25.0, 40.0, 220.0, 100.0, 420.0, 420.0], dtype=np.float32)


def _jitter(rng: np.random.Generator, values, spread_mm: float) -> np.ndarray:
    return np.asarray(values, float) + rng.uniform(-spread_mm, spread_mm, size=len(values))


def draw_heart_case(rng: np.random.Generator, matrix: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: MRI signal (i, j, k) int16, label (i, j, k) uint8, affine (4, 4)."""
    pixel = FIELD_OF_VIEW_MM[0] / matrix
    slice_thickness = pixel * rng.uniform(1.3, 1.8)  # anisotropic, as the MSD heart scans (and more)
    shape = (matrix, matrix, int(round(EXTENT_Z_MM / slice_thickness)))
    grid = Grid.centred(shape, (pixel, pixel, slice_thickness))
    tissue = np.full(shape, AIR, dtype=np.uint8)
    scale = rng.uniform(0.9, 1.1)  # patient size

    # Chest: fat under the skin, muscle, then the lungs on both sides of the mediastinum.
    chest = scale * np.array([150.0, 105.0, 400.0])
    paint_ellipsoid(tissue, grid, FAT, center=(0, 20, 0), semi_axes=chest)
    paint_ellipsoid(tissue, grid, MUSCLE, center=(0, 20, 0), semi_axes=chest - [12, 12, 0])
    for side in (-1, 1):
        paint_ellipsoid(tissue, grid, LUNG, center=_jitter(rng, (side * 70 * scale, 25, 20), 5),
                        semi_axes=scale * _jitter(rng, (55, 70, 150), 5))
    paint_ellipsoid(tissue, grid, MUSCLE, center=(0, 20, 0),
                    semi_axes=scale * np.array([45.0, 90.0, 400.0]))  # mediastinum
    paint_ellipsoid(tissue, grid, BONE, center=(0, 85 * scale, 0), semi_axes=(20, 17, 400))  # vertebral body
    paint_ellipsoid(tissue, grid, MARROW, center=(0, 85 * scale, 0), semi_axes=(16, 13, 400))
    paint_ellipsoid(tissue, grid, FAT, center=(0, -75 * scale, 0), semi_axes=(30, 8, 400))  # fat behind the sternum

    # Heart, turned as a whole by a per-case angle about Z.
    turn = rng.uniform(-0.35, 0.35)
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])

    def place(point, spread=4.0):
        return rotation @ _jitter(rng, scale * np.asarray(point, float), spread)

    left_ventricle = place((22, -18, -22))
    lv_axes = scale * _jitter(rng, (32, 26, 40), 4)
    paint_ellipsoid(tissue, grid, MYOCARDIUM, center=left_ventricle, semi_axes=lv_axes + 10, angle=turn + 0.5)
    paint_ellipsoid(tissue, grid, MYOCARDIUM, center=place((-18, -32, -15)),
                    semi_axes=scale * _jitter(rng, (34, 18, 38), 3) + 4, angle=turn)
    paint_ellipsoid(tissue, grid, BLOOD, center=place((-18, -32, -15)),
                    semi_axes=scale * _jitter(rng, (30, 14, 34), 3), angle=turn)  # RV
    paint_ellipsoid(tissue, grid, BLOOD, center=left_ventricle, semi_axes=lv_axes, angle=turn + 0.5)
    paint_ellipsoid(tissue, grid, BLOOD, center=place((-35, 8, 10)),
                    semi_axes=scale * _jitter(rng, (20, 20, 24), 3))  # RA
    aortic_root = place((0, -5, 12))
    paint_tube(tissue, grid, BLOOD, start=aortic_root, end=aortic_root + [0, 5, 120],
               radius=13 * scale)  # ascending aorta
    descending = place((25, 60, 0), 3)
    paint_tube(tissue, grid, BLOOD, start=descending - [0, 0, 200], end=descending + [0, 0, 200], radius=11 * scale)

    # Left atrium behind the ventricles, its four pulmonary veins running out to the lungs (bright
    # like the atrium and unlabelled, so the boundary must be found where they join).
    left_atrium = place((5, 32, 18))
    la_axes = scale * _jitter(rng, (27, 18, 20), 3)
    for side in (-1, 1):
        for height in (-10, 10):
            vein_end = left_atrium + rotation @ (scale * _jitter(rng, (side * 55, 12, height), 6))
            paint_tube(tissue, grid, BLOOD, start=left_atrium, end=vein_end, radius=scale * rng.uniform(5, 7))
    atrium = paint_ellipsoid(tissue, grid, LEFT_ATRIUM, center=left_atrium, semi_axes=la_axes,
                             angle=turn + rng.uniform(-0.3, 0.3))

    # Signal: tissue means with small per-case contrast changes, texture, coil bias, gain, Rician noise.
    signal = (SIGNAL * rng.uniform(0.9, 1.1, size=len(SIGNAL)).astype(np.float32))[tissue]
    signal *= 1 + 0.04 * smooth_field(rng, shape, coarse=9)
    signal *= np.exp(0.25 * smooth_field(rng, shape, coarse=4))  # receive-coil sensitivity
    signal *= rng.uniform(0.5, 2.0)  # arbitrary scanner gain
    noise = signal.mean() * rng.uniform(0.03, 0.06)
    signal = np.hypot(signal + rng.normal(0, noise, shape), rng.normal(0, noise, shape))
    affine = np.diag([-pixel, -pixel, slice_thickness, 1.0])
    affine[:3, 3] = rng.uniform(-30, 30, size=3)
    return np.clip(signal, 0, 32767).astype(np.int16), atrium.astype(np.uint8), affine


def write_heart_phantom(root: Path, num_cases: int, matrix: int, seed: int, version: int) -> Path:
    """Write `num_cases` cardiac MRI cases (heart_001, ...) as an MSD folder at `root`."""
    def cases():
        for index in range(num_cases):
            rng = np.random.default_rng([seed, index])
            image, label, affine = draw_heart_case(rng, matrix)
            yield f"heart_{index + 1:03d}", image, label, affine

    return write_msd_dataset(root, name="Task02_Heart", description="Synthetic left atrium cardiac MRI (bSSFP-like)",
                             modality={0: "MRI"}, labels=LABELS, cases=cases())


def ensure_heart_phantom(cache_root: str | Path, num_cases: int = 16, matrix: int = 96, seed: int = 0) -> Path:
    """The phantom folder under `cache_root`, generated once per parameter set.

    Args:
        num_cases: number of volumes (at least 2, for a train/validation split).
        matrix: in-plane voxels per slice over a 200 mm field of view: the size knob (tests use ~24).
    """
    return ensure_dataset(cache_root, "Task02_Heart", write_heart_phantom, num_cases=num_cases, matrix=matrix,
                          seed=seed, version=GENERATOR_VERSION)

"""Chest CT phantom with lung nodules labelled, written as a Task06_Lung-like MSD folder.

Each case is a contrast-enhanced chest CT in Hounsfield units: body wall (fat, muscle), lungs around
-850 HU with texture, mediastinum with heart, aorta and spine, airways (trachea, main and lobar bronchi,
air inside a soft-tissue wall) and a tree of pulmonary vessels 3-9 mm across, the size of many nodules,
so a round bright spot on one slice may be either. One to three nodules of 3-30 mm diameter, lobulated
and of soft-tissue density, are labelled; they make far under 1% of the voxels. Every sixth case
(lung_006, lung_012, ...) has no nodule, so that with the default split of 16 cases one training and
one validation case hold no tumour and the false-positive side of Dice is tested too.

    from data.synthetic.lung import ensure_lung_phantom
    root = ensure_lung_phantom(".cache/synthetic", num_cases=16, matrix=192)

Patient coordinates while drawing, in millimetres: X towards the patient's left, Y towards the back,
Z towards the head. The grid is indexed (i, j, k) = (X, Y, Z), an axial stack, whose NIfTI affine is
diag(-sx, -sy, sz) in RAS+.
"""

from pathlib import Path

import numpy as np
from scipy import ndimage

from data.synthetic.msd_layout import ensure_dataset, write_msd_dataset
from data.synthetic.shapes import Grid, paint_ellipsoid, paint_tube, smooth_field

GENERATOR_VERSION = 1  # bump when the drawn anatomy changes, so cached phantoms are regenerated
LABELS = {0: "background", 1: "tumour"}
FIELD_OF_VIEW_MM = 340.0  # in-plane, a whole chest
EXTENT_Z_MM = 180.0  # head-foot coverage, lung apices to bases
TUMOUR_FREE_EVERY = 6  # every sixth case has no nodule


def _direction(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)


def _draw_vessel_tree(rng, hu, grid, lung, *, start, value, generations: int, radius: float, length: float):
    """A branching tree of tubes from `start`, kept inside the lung (segments leaving it stop)."""
    tips = [(np.asarray(start, float), radius, length)]
    for _ in range(generations):
        next_tips = []
        for tip, tip_radius, tip_length in tips:
            for _ in range(2):
                end = tip + _direction(rng) * tip_length * rng.uniform(0.7, 1.2)
                index = tuple(int(np.clip(np.searchsorted(axis, coordinate), 0, len(axis) - 1))
                              for axis, coordinate in zip(grid.axes, end))
                if not lung[index]:
                    continue
                paint_tube(hu, grid, value, start=tip, end=end, radius=tip_radius)
                next_tips.append((end, tip_radius * rng.uniform(0.65, 0.85), tip_length * 0.8))
        tips = next_tips


def draw_lung_case(rng: np.random.Generator, matrix: int, with_tumour: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: CT (i, j, k) int16 Hounsfield units, label (i, j, k) uint8, affine (4, 4)."""
    pixel = FIELD_OF_VIEW_MM / matrix
    slice_thickness = pixel * float(rng.choice([1.0, 1.25, 1.5]))  # thin-slice to routine CT
    shape = (matrix, matrix, int(round(EXTENT_Z_MM / slice_thickness)))
    grid = Grid.centred(shape, (pixel, pixel, slice_thickness))
    hu = np.full(shape, -1000.0, dtype=np.float32)
    scale = rng.uniform(0.9, 1.05)

    chest = scale * np.array([155.0, 110.0, 600.0])
    paint_ellipsoid(hu, grid, rng.uniform(-110, -90), center=(0, 10, 0), semi_axes=chest)  # subcutaneous fat
    paint_ellipsoid(hu, grid, rng.uniform(40, 55), center=(0, 10, 0),
                    semi_axes=chest - [14, 14, 0])  # muscle, mediastinum
    lungs = []
    for side in (-1, 1):
        lungs.append(paint_ellipsoid(hu, grid, rng.uniform(-870, -830), center=(side * 72 * scale, 12, -10),
                                     semi_axes=scale * (np.array([60.0, 82.0, 120.0]) + rng.uniform(-5, 5, 3))))
    lung = lungs[0] | lungs[1]
    hu[lung] += 25 * smooth_field(rng, shape, coarse=12)[lung]  # parenchymal texture
    paint_ellipsoid(hu, grid, rng.uniform(35, 50), center=(12, -28, -60),
                    semi_axes=scale * np.array([58.0, 48.0, 55.0]))  # heart
    paint_tube(hu, grid, rng.uniform(150, 220), start=(0, -5, -200), end=(0, -5, 200),
               radius=13 * scale)  # aorta (contrast)
    paint_ellipsoid(hu, grid, rng.uniform(600, 750), center=(0, 80 * scale, 0),
                    semi_axes=(19, 16, 600))  # vertebral cortex
    paint_ellipsoid(hu, grid, rng.uniform(200, 300), center=(0, 80 * scale, 0), semi_axes=(15, 12, 600))  # marrow
    paint_ellipsoid(hu, grid, rng.uniform(400, 600), center=(0, -100 * scale, 0), semi_axes=(14, 5, 600))  # sternum

    # Vessels: contrast-filled trees from each hilum, 3-9 mm across near it and thinner outwards.
    vessel_hu = rng.uniform(120, 220)
    for side in (-1, 1):
        for _ in range(4):
            hilum = np.array([side * 45 * scale, 12, -5]) + rng.uniform(-10, 10, 3)
            _draw_vessel_tree(rng, hu, grid, lung, start=hilum, value=vessel_hu, generations=4,
                              radius=rng.uniform(3.0, 4.5), length=35 * scale)

    # Airways: air inside a soft-tissue wall, trachea down to the carina, then the bronchi.
    carina = np.array([0, 20, 35]) + rng.uniform(-4, 4, 3)
    paint_tube(hu, grid, 20.0, start=carina, end=carina + [0, -5, 200], radius=10.5)
    paint_tube(hu, grid, -1000.0, start=carina, end=carina + [0, -5, 200], radius=8.0)
    for side in (-1, 1):
        bronchus_end = carina + [side * 45 * scale, 8, -25]
        paint_tube(hu, grid, 20.0, start=carina, end=bronchus_end, radius=7.0)
        for _ in range(3):
            lobar_end = bronchus_end + _direction(rng) * 35 * scale
            if lung[tuple(int(np.clip(np.searchsorted(a, c), 0, len(a) - 1)) for a, c in zip(grid.axes, lobar_end))]:
                paint_tube(hu, grid, 20.0, start=bronchus_end, end=lobar_end, radius=4.0)
                paint_tube(hu, grid, -1000.0, start=bronchus_end, end=lobar_end, radius=2.5)
        paint_tube(hu, grid, -1000.0, start=carina, end=bronchus_end, radius=5.0)

    # Nodules: lobulated soft-tissue lumps inside a lung, 3-30 mm across, most of them over 10 mm.
    label = np.zeros(shape, dtype=np.uint8)
    if with_tumour:
        inner = ndimage.binary_erosion(lung, iterations=2)
        candidates = np.argwhere(inner)
        for _ in range(rng.integers(1, 4)):
            diameter = rng.uniform(10, 30) if rng.uniform() < 0.75 else rng.uniform(3, 10)
            center = np.array([axis[i] for axis, i in zip(grid.axes, candidates[rng.integers(len(candidates))])])
            nodule_hu = rng.uniform(-20, 50)
            nodule = np.zeros(shape, dtype=bool)
            nodule |= paint_ellipsoid(hu, grid, nodule_hu, center=center,
                                      semi_axes=diameter / 2 * rng.uniform(0.85, 1.15, 3),
                                      angle=rng.uniform(0, np.pi))
            for _ in range(2):  # lobulation
                offset = _direction(rng) * diameter * 0.3
                nodule |= paint_ellipsoid(hu, grid, nodule_hu, center=center + offset, semi_axes=[diameter * 0.3] * 3)
            label[nodule] = 1

    # Acquisition: partial-volume blur, then quantum noise.
    hu = ndimage.gaussian_filter(hu, sigma=(0.6, 0.6, 0.4))
    hu += rng.normal(0, rng.uniform(12, 25), shape).astype(np.float32)
    affine = np.diag([-pixel, -pixel, slice_thickness, 1.0])
    affine[:3, 3] = rng.uniform(-40, 40, size=3)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label, affine


def write_lung_phantom(root: Path, num_cases: int, matrix: int, seed: int, version: int) -> Path:
    """Write `num_cases` chest CTs (lung_001, ...) as an MSD folder at `root`."""
    def cases():
        for index in range(num_cases):
            rng = np.random.default_rng([seed, index])
            with_tumour = (index + 1) % TUMOUR_FREE_EVERY != 0
            image, label, affine = draw_lung_case(rng, matrix, with_tumour)
            yield f"lung_{index + 1:03d}", image, label, affine

    return write_msd_dataset(root, name="Task06_Lung", description="Synthetic lung nodule chest CT",
                             modality={0: "CT"}, labels=LABELS, cases=cases())


def ensure_lung_phantom(cache_root: str | Path, num_cases: int = 16, matrix: int = 192, seed: int = 0) -> Path:
    """The phantom folder under `cache_root`, generated once per parameter set.

    Args:
        num_cases: number of volumes (at least 2, for a train/validation split).
        matrix: in-plane voxels over a 340 mm field of view: the size knob (tests use ~32).
    """
    return ensure_dataset(cache_root, "Task06_Lung", write_lung_phantom, num_cases=num_cases, matrix=matrix,
                          seed=seed, version=GENERATOR_VERSION)

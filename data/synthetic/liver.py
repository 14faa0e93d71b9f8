"""Abdominal CT phantom with liver and liver tumours, written as a Task03_Liver-like MSD folder.

Each case is a portal-venous CT of the upper abdomen in Hounsfield units: body wall, liver,
spleen (same density as the liver, so intensity alone does not find the liver), kidneys, great
vessels, spine, stomach and bowel with air, lung bases, gallbladder, and 1-6 liver tumours
whose contrast to the liver is often small. Spacing, field of view, affine and orientation vary
per case like real scanner exports, so the reader's reorientation and resampling are exercised.

    from data.synthetic.liver import ensure_liver_phantom
    root = ensure_liver_phantom(".cache/phantoms", num_cases=20, matrix=128)

Patient coordinates used while drawing, in millimetres: X towards the patient's left,
Y towards the back, Z towards the head. The drawing grid is indexed (i, j, k) = (X, Y, Z), the
order of an axial DICOM series, whose NIfTI affine is diag(-sx, -sy, sz) in RAS+.
"""

from pathlib import Path

import numpy as np
from scipy import ndimage

from data.synthetic.msd_layout import ensure_dataset, write_msd_dataset

GENERATOR_VERSION = 2  # bump when the drawn anatomy changes, so cached phantoms are regenerated
LABELS = {0: "background", 1: "liver", 2: "cancer"}
SLICE_THICKNESSES_MM = (2.5, 3.0, 4.0, 5.0)
# Cycled over cases so even a three-case dataset has a permuted and an oblique file.
ORIENTATIONS = ("axial", "oblique", "permuted", "ras", "feet_first")

# Tissue codes of the drawing; only LIVER, HEPATIC_VESSEL and TUMOUR carry labels.
(AIR, FAT, VISCERAL_FAT, MUSCLE, LIVER, HEPATIC_VESSEL, TUMOUR, SPLEEN, KIDNEY_CORTEX,
 KIDNEY_MEDULLA, RENAL_SINUS, AORTA, CAVA, BONE_CORTEX, BONE_MARROW, DISC, CSF, STOMACH_WALL,
 FLUID, BOWEL_WALL, BOWEL_CONTENT, LUNG, HEART, RIB) = range(24)


def _draw_tissue_hu(rng: np.random.Generator, liver_hu: float) -> np.ndarray:
    """Mean Hounsfield unit per tissue code for one case (portal-venous phase)."""
    aorta_hu = rng.uniform(150, 200)
    hu = np.zeros(24, dtype=np.float32)
    hu[[AIR, FAT, VISCERAL_FAT, MUSCLE]] = -1000, rng.uniform(-110, -90), rng.uniform(-100, -80), \
        rng.uniform(45, 60)
    # Tumour voxels start at the liver's value; their own contrast is added per tumour.
    hu[[LIVER, HEPATIC_VESSEL, TUMOUR, SPLEEN]] = liver_hu, liver_hu + rng.uniform(30, 60), \
        liver_hu, liver_hu + rng.uniform(-15, 15)
    hu[[KIDNEY_CORTEX, KIDNEY_MEDULLA, RENAL_SINUS]] = rng.uniform(150, 180), \
        rng.uniform(100, 140), rng.uniform(-40, 0)
    hu[[AORTA, CAVA, HEART]] = aorta_hu, aorta_hu - rng.uniform(0, 30), rng.uniform(110, 150)
    hu[[BONE_CORTEX, BONE_MARROW, DISC, CSF, RIB]] = rng.uniform(600, 750), \
        rng.uniform(250, 350), rng.uniform(70, 100), rng.uniform(0, 20), rng.uniform(400, 600)
    hu[[STOMACH_WALL, FLUID, BOWEL_WALL, BOWEL_CONTENT, LUNG]] = rng.uniform(50, 70), \
        rng.uniform(0, 20), rng.uniform(60, 90), rng.uniform(10, 40), rng.uniform(-880, -820)
    return hu


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray,
                  correlation_mm: float) -> np.ndarray:
    """Unit-SD random field varying over ~correlation_mm, drawn on a coarse grid and upsampled.

    Args:
        shape: (nx, ny, nz) of the output.
        spacing: (3,) voxel size in mm.
    """
    coarse_step_mm = correlation_mm / 3
    extent_mm = np.asarray(shape) * spacing
    coarse_shape = np.maximum(np.ceil(extent_mm / coarse_step_mm).astype(int) + 1, 2)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32),
                                    sigma=1.5, mode="wrap")
    field = (field - field.mean()) / field.std()
    # Trilinear upsampling is separable: one small interpolation matrix per axis.
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        weights = _linear_interpolation_matrix(np.arange(n) * s / coarse_step_mm, field.shape[axis])
        field = np.moveaxis(np.tensordot(weights, field, axes=(1, axis)), 0, axis)
    return np.ascontiguousarray(field)


def _linear_interpolation_matrix(positions: np.ndarray, num_points: int) -> np.ndarray:
    """(len(positions), num_points) weights interpolating samples at 0..num_points-1 linearly."""
    lower = np.clip(np.floor(positions).astype(int), 0, num_points - 2)
    fraction = np.clip(positions - lower, 0, 1)
    weights = np.zeros((len(positions), num_points), dtype=np.float32)
    rows = np.arange(len(positions))
    weights[rows, lower] = 1 - fraction
    weights[rows, lower + 1] = fraction
    return weights


def _ellipsoid_radius(coords, center, semi_axes, rotation=None) -> np.ndarray:
    """Normalised radius (1 on the surface) of an ellipsoid, evaluated at broadcast coordinates.

    Args:
        coords: (X, Y, Z) arrays broadcasting to the volume shape, mm.
        center, semi_axes: (3,) mm.
        rotation: optional (3, 3) matrix whose columns are the ellipsoid's axes.
    """
    offsets = [c - m for c, m in zip(coords, center)]
    if rotation is not None:
        offsets = [sum(rotation[row, axis] * offsets[row] for row in range(3)) for axis in range(3)]
    squared = sum((offset / semi) ** 2 for offset, semi in zip(offsets, semi_axes))
    return np.sqrt(squared)


def _rotation(rng: np.random.Generator, max_degrees: float, axis=None,
              min_degrees: float = 0.0) -> np.ndarray:
    """Rotation by min..max_degrees either way about `axis` (random unit vector when None)."""
    axis = rng.standard_normal(3) if axis is None else np.asarray(axis, dtype=float)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(min_degrees, max_degrees) * rng.choice([-1, 1]))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _draw_body(tissue, coords, cavity_semi, wall_mm, fat_mm):
    """Body outline, subcutaneous fat and muscle wall; returns the abdominal cavity mask."""
    X, Y, Z = coords
    ai, bi = cavity_semi
    body = ((np.abs(X) / (ai + wall_mm + fat_mm)) ** 2.2
            + (np.abs(Y) / (bi + wall_mm + fat_mm)) ** 2.2) < 1
    wall = ((np.abs(X) / (ai + wall_mm)) ** 2.2 + (np.abs(Y) / (bi + wall_mm)) ** 2.2) < 1
    cavity = (X / ai) ** 2 + (Y / bi) ** 2 < 1
    body, wall, cavity = (np.broadcast_to(mask, tissue.shape) for mask in (body, wall, cavity))
    tissue[body] = FAT
    tissue[wall] = MUSCLE
    tissue[cavity] = VISCERAL_FAT
    return cavity


def _draw_liver(tissue, coords, rng, *, cavity, cavity_semi, dome_z, spacing):
    """Deformed two-lobe liver in the right upper abdomen with ~1.2-2 L volume."""
    X, Y, Z = coords
    ai, bi = cavity_semi
    height = rng.uniform(70, 85)  # half the cranio-caudal extent of the right lobe
    center_z = dome_z - 0.9 * height
    # The right lobe is broad under the diaphragm and tapers towards its inferior tip.
    taper = 0.75 + 0.25 * np.clip((Z - center_z) / height, -1, 1)
    right_center = (-0.42 * ai, rng.uniform(-0.1, 0.05) * bi)
    right = _ellipsoid_radius(((X - right_center[0]) / taper, (Y - right_center[1]) / taper, Z),
                              (0, 0, center_z), (0.65 * ai, 0.9 * bi, height))
    left = _ellipsoid_radius(coords, (rng.uniform(0.0, 0.2) * ai, -0.45 * bi, dome_z - 40),
                             (rng.uniform(0.3, 0.45) * ai, 0.3 * bi, 40),
                             _rotation(rng, 15, (0, 0, 1)))
    smoothing = 0.15
    level = -smoothing * np.logaddexp(-right / smoothing, -left / smoothing)
    level = level + 0.12 * _smooth_noise(rng, tissue.shape, spacing, correlation_mm=40)
    level[~cavity] = np.inf
    # Threshold at the level that gives the drawn volume, so size is controlled, shape is not;
    # lungs, vessels and gallbladder drawn later take back roughly a sixth of it.
    target_voxels = int(rng.uniform(1500e3, 2400e3) / np.prod(spacing))
    threshold = np.partition(level.ravel(), target_voxels)[target_voxels]
    tissue[level < min(threshold, 1.4)] = LIVER
    return center_z, height


def _draw_organs(tissue, coords, rng, *, cavity, cavity_semi, dome_z, spacing):
    """Organs around the liver, drawn in an order where later ones overwrite earlier ones."""
    X, Y, Z = coords
    ai, bi = cavity_semi
    shape = tissue.shape
    spine_y = 0.62 * bi

    # Bowel below the liver: loops of fluid with enhancing walls and gas rising anteriorly.
    loops = _smooth_noise(rng, shape, spacing, correlation_mm=30)
    gas = _smooth_noise(rng, shape, spacing, correlation_mm=20) - 0.01 * Y
    lower = cavity & (Z < dome_z - 60) & (tissue == VISCERAL_FAT)
    tissue[lower & (loops > -0.2)] = BOWEL_WALL
    tissue[lower & (loops > 0.1)] = BOWEL_CONTENT
    tissue[lower & (loops > 0.1) & (gas > 1.3)] = AIR

    # Stomach in the left upper quadrant with an air-fluid level (the patient lies supine).
    stomach_center = (rng.uniform(0.25, 0.4) * ai, -0.3 * bi, dome_z - rng.uniform(50, 70))
    stomach = _ellipsoid_radius(coords, stomach_center, (0.25 * ai, 0.3 * bi, 50))
    tissue[cavity & (stomach < 1)] = STOMACH_WALL
    tissue[cavity & (stomach < 0.9)] = FLUID
    tissue[cavity & (stomach < 0.9) & (Y < stomach_center[1] - rng.uniform(0, 0.2) * bi)] = AIR

    center_z, height = _draw_liver(tissue, coords, rng, cavity=cavity, cavity_semi=cavity_semi, dome_z=dome_z,
                                   spacing=spacing)

    if rng.random() < 0.8:  # the gallbladder is hypodense like a tumour but is not liver
        gallbladder = _ellipsoid_radius(
            coords, (-0.2 * ai, -0.4 * bi, center_z - 0.5 * height), (14, 16, 35),
            _rotation(rng, 20))
        tissue[cavity & (gallbladder < 1)] = FLUID

    spleen = _ellipsoid_radius(coords, (0.62 * ai, 0.3 * bi, dome_z - rng.uniform(40, 60)),
                               (0.2 * ai, 0.38 * bi, 55), _rotation(rng, 30, (0, 0, 1)))
    spleen = spleen + 0.1 * _smooth_noise(rng, shape, spacing, correlation_mm=40)
    tissue[cavity & (spleen < 1)] = SPLEEN

    for side, z_offset in ((-1, rng.uniform(50, 70)), (1, rng.uniform(30, 50))):
        kidney = _ellipsoid_radius(coords, (side * 0.42 * ai, spine_y - 5, center_z - z_offset),
                                   (25, 22, 50), _rotation(rng, 20))
        tissue[cavity & (kidney < 1)] = KIDNEY_CORTEX
        tissue[cavity & (kidney < 0.75)] = KIDNEY_MEDULLA
        hilum = cavity & (kidney < 0.6) & (side * (X - side * 0.42 * ai) < 0)
        tissue[hilum] = RENAL_SINUS

    # Lung bases above the diaphragm, which domes highest in the middle of each hemithorax; the
    # costophrenic recesses reach down beside the liver.
    hemithorax = ((np.abs(X) - 0.45 * ai) / (0.45 * ai)) ** 2 + (Y / bi) ** 2
    tissue[cavity & (Z > dome_z + 5 - 35 * np.clip(hemithorax - 0.3, 0, 1))] = LUNG
    heart = _ellipsoid_radius(coords, (0.1 * ai, -0.25 * bi, dome_z + 50), (0.4 * ai, 0.4 * bi, 55))
    tissue[cavity & (heart < 1)] = HEART

    aorta_radius = rng.uniform(10, 13)
    aorta = (X - 12) ** 2 + (Y - (spine_y - 32)) ** 2 < aorta_radius ** 2
    cava = ((X + 0.2 * ai) / 14) ** 2 + ((Y - (spine_y - 38)) / 10) ** 2 < 1
    tissue[np.broadcast_to(aorta, shape)] = AORTA
    tissue[np.broadcast_to(cava, shape)] = CAVA
    _draw_spine(tissue, coords, rng, spine_y=spine_y, cavity_semi=cavity_semi, dome_z=dome_z)


def _draw_spine(tissue, coords, rng, *, spine_y, cavity_semi, dome_z):
    """Vertebral bodies with cortical rim and discs, spinal canal, paraspinal muscles, ribs."""
    X, Y, Z = coords
    ai, bi = cavity_semi
    shape = tissue.shape
    paraspinal = ((np.abs(X) - 35) / 28) ** 2 + ((Y - spine_y - 40) / 25) ** 2 < 1
    tissue[np.broadcast_to(paraspinal, shape)] = MUSCLE
    vertebra = (X / 21) ** 2 + ((Y - spine_y) / 17) ** 2
    canal = X ** 2 + (Y - spine_y - 27) ** 2
    arch = (canal < 16 ** 2) | ((np.abs(X) < 5) & (Y > spine_y + 27) & (Y < spine_y + 55))
    level_period = rng.uniform(32, 38)  # lumbar vertebra plus disc height
    disc = np.mod(Z + rng.uniform(0, level_period), level_period) < 8
    tissue[np.broadcast_to(arch, shape)] = BONE_CORTEX
    tissue[np.broadcast_to(canal < 9 ** 2, shape)] = CSF
    tissue[np.broadcast_to(vertebra < 1, shape)] = BONE_CORTEX
    tissue[np.broadcast_to(vertebra < 0.75, shape)] = BONE_MARROW
    tissue[(vertebra < 1) & disc] = DISC
    # Ribs cross the body wall obliquely in the upper abdomen, lateral and posterior only.
    cavity_radius = (X / ai) ** 2 + (Y / bi) ** 2
    wall_ring = ((X / (ai + 6)) ** 2 + (Y / (bi + 6)) ** 2 < 1) & (cavity_radius > 1)
    rib_phase = np.sin(2 * np.pi * (Z + 0.4 * Y) / rng.uniform(25, 32))
    ribs = wall_ring & (rib_phase > 0.55) & (Y > -0.4 * bi) & (Z > dome_z - 120)
    tissue[ribs & (tissue == MUSCLE)] = RIB


def _draw_hepatic_vessels(tissue, rng, spacing):
    """Tubes along the intersection of two random level sets: a vessel-like network in the liver."""
    first = _smooth_noise(rng, tissue.shape, spacing, correlation_mm=45)
    second = _smooth_noise(rng, tissue.shape, spacing, correlation_mm=45)
    tubes = (np.abs(first) < 0.25) & (np.abs(second) < 0.35)
    tissue[tubes & (tissue == LIVER)] = HEPATIC_VESSEL


def _draw_tumours(tissue, rng, spacing) -> np.ndarray:
    """Label 1-6 tumours inside the liver; returns their HU offset from the liver, (nx, ny, nz).

    The label is the crisp region inside each tumour's surface; the intensity fades over the
    last ~15% of the radius on either side, so edges are not given away by a step.
    """
    liver = (tissue == LIVER) | (tissue == HEPATIC_VESSEL)
    depth_mm = ndimage.distance_transform_edt(liver, sampling=spacing)
    offset = np.zeros(tissue.shape, dtype=np.float32)
    num_tumours = rng.integers(1, 7)
    diameters = np.exp(rng.uniform(np.log(5), np.log(40), size=num_tumours))
    # Most Task03 cases have a dominant lesion of a few centimetres beside smaller ones; it also
    # keeps the per-case tumour Dice from hinging on a handful of voxels.
    diameters[0] = rng.uniform(20, 50)
    for diameter in diameters:
        # Centre deep enough that most of the tumour lies in the liver.
        candidates = np.argwhere(depth_mm >= min(0.5 * diameter, 0.7 * depth_mm.max()))
        center = candidates[rng.integers(len(candidates))]
        semi_axes = 0.5 * diameter * rng.uniform(0.8, 1.2, size=3)
        half_box = np.ceil(1.3 * semi_axes.max() / spacing).astype(int) + 1
        low = np.maximum(center - half_box, 0)
        high = np.minimum(center + half_box + 1, tissue.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        local = [(np.arange(a, b) - c) * s for a, b, c, s in zip(low, high, center, spacing)]
        local = np.meshgrid(*local, indexing="ij", sparse=True)
        rotation = _rotation(rng, 180)
        radius = _ellipsoid_radius(local, (0, 0, 0), semi_axes, rotation)
        # Lobulated outline: two plane waves with wavelengths near the diameter.
        for _ in range(2):
            direction = rng.standard_normal(3)
            wave = sum(d * c for d, c in zip(direction / np.linalg.norm(direction), local))
            radius = radius * (1 + 0.08 * np.sin(2 * np.pi * wave / diameter + rng.uniform(0, 6.3)))
        in_liver = liver[box] | (tissue[box] == TUMOUR)
        # Mostly hypodense; many within 40 HU of the liver, which makes them hard to see.
        contrast = rng.uniform(20, 40) if rng.random() < 0.55 else rng.uniform(40, 80)
        contrast *= -1 if rng.random() < 0.8 else 1
        weight = np.clip((1.15 - radius) / 0.3, 0, 1)
        if diameter > 25:  # large tumours often have a darker necrotic centre
            contrast = contrast - rng.uniform(10, 30) * (radius < 0.5)
        tumour_offset = np.where(in_liver, contrast * weight, 0).astype(np.float32)
        offset[box] = np.where(np.abs(tumour_offset) > np.abs(offset[box]), tumour_offset,
                               offset[box])
        tissue[box][in_liver & (radius < 1)] = TUMOUR
    return offset


def _flip_axes(arrays, affine, axes):
    """Reverse `axes` of every array; adjust the affine so voxels keep their world position."""
    index_map = np.eye(4)  # new index -> old index
    for axis in axes:
        index_map[axis, axis], index_map[axis, 3] = -1, arrays[0].shape[axis] - 1
    return [np.flip(a, axes) for a in arrays], affine @ index_map


def _reorient(arrays, affine, orientation, rng):
    """Store the drawn (X, Y, Z)-ordered arrays the way the chosen scanner export would."""
    if orientation == "ras":  # written by a tool that stores RAS+ arrays
        arrays, affine = _flip_axes(arrays, affine, (0, 1))
    elif orientation == "feet_first":  # slices stored head to feet
        arrays, affine = _flip_axes(arrays, affine, (2,))
    elif orientation == "permuted":  # stored as (k, j, i), as a naive (z, y, x) writer does
        arrays = [a.transpose(2, 1, 0) for a in arrays]
        affine = affine[:, [2, 1, 0, 3]]
    elif orientation == "oblique":  # tilted gantry or patient: a few degrees off the axes
        tilt = np.eye(4)
        tilt[:3, :3] = _rotation(rng, 6, min_degrees=2)
        affine = tilt @ affine
    elif orientation != "axial":
        raise ValueError(f"unknown orientation {orientation!r}")
    return [np.ascontiguousarray(a) for a in arrays], affine


def make_liver_case(rng: np.random.Generator, matrix: int = 128,
                    orientation: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one abdominal CT with liver and tumour labels.

    Args:
        rng: source of every random choice, so the case is reproducible.
        matrix: in-plane voxels per side; the slice count follows from the drawn slice thickness
            and a 180-240 mm cranio-caudal coverage.
        orientation: one of ORIENTATIONS, or None to draw one.

    Returns:
        image: int16 Hounsfield units, (i, j, k) file order.
        label: uint8 (i, j, k), 0 background, 1 liver, 2 cancer.
        affine: (4, 4) float64, (i, j, k, 1) -> RAS+ mm, shared by image and label.
    """
    field_of_view = rng.uniform(330, 420)
    thickness = rng.choice(SLICE_THICKNESSES_MM)
    num_slices = int(round(rng.uniform(180, 240) / thickness))
    shape = (matrix, matrix, num_slices)
    spacing = np.array([field_of_view / matrix, field_of_view / matrix, thickness])
    center = (np.array(shape) - 1) / 2 * spacing
    center[:2] += rng.uniform(-10, 10, size=2)  # the patient is never exactly at the isocentre
    X, Y, Z = (np.arange(n, dtype=np.float32) * s - c
               for n, s, c in zip(shape, spacing, [center[0], center[1], 0]))
    coords = (X[:, None, None], Y[None, :, None], Z[None, None, :])

    fat_mm, wall_mm = rng.uniform(8, 30), rng.uniform(8, 14)
    outer_semi_x = 0.5 * field_of_view * rng.uniform(0.78, 0.9)
    cavity_semi = (outer_semi_x - fat_mm - wall_mm,
                   outer_semi_x * rng.uniform(0.68, 0.8) - fat_mm - wall_mm)
    dome_z = num_slices * thickness - rng.uniform(15, 35)
    liver_hu = rng.uniform(100, 130)

    tissue = np.full(shape, AIR, dtype=np.uint8)
    cavity = _draw_body(tissue, coords, cavity_semi, wall_mm, fat_mm)
    _draw_organs(tissue, coords, rng, cavity=cavity, cavity_semi=cavity_semi, dome_z=dome_z, spacing=spacing)
    _draw_hepatic_vessels(tissue, rng, spacing)
    tumour_offset = _draw_tumours(tissue, rng, spacing)

    tissue_hu = _draw_tissue_hu(rng, liver_hu)
    texture = _smooth_noise(rng, shape, spacing, correlation_mm=15)
    texture_amplitude = np.where(tissue == AIR, 0, 5).astype(np.float32)
    image = tissue_hu[tissue] + texture_amplitude * texture + tumour_offset
    # Point spread: about half a voxel in-plane; the slice profile's FWHM equals the thickness.
    image = ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 1 / 2.355))
    # Quantum noise is slightly correlated between neighbouring voxels; rescale to the drawn SD.
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=0.5)
    image += rng.uniform(12, 18) / noise.std() * noise
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)

    label = np.zeros(shape, dtype=np.uint8)
    label[(tissue == LIVER) | (tissue == HEPATIC_VESSEL)] = 1
    label[tissue == TUMOUR] = 2

    # Axial DICOM series: i towards the left, j towards the back, k towards the head, origin at
    # the first voxel's table position.
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [center[0] + rng.uniform(-5, 5), center[1] + rng.uniform(-5, 5),
                     rng.uniform(-800, -100)]
    if orientation is None:
        orientation = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
    (image, label), affine = _reorient([image, label], affine, orientation, rng)
    return image, label, affine


def _liver_cases(num_cases: int, matrix: int, seed: int):
    # One independent stream per case: case k is the same whatever num_cases is.
    for index, case_seed in enumerate(np.random.SeedSequence(seed).spawn(num_cases)):
        rng = np.random.default_rng(case_seed)
        image, label, affine = make_liver_case(rng, matrix, ORIENTATIONS[index % len(ORIENTATIONS)])
        yield f"liver_{index}", image, label, affine


def write_liver_phantom(root: str | Path, num_cases: int = 20, matrix: int = 128,
                        seed: int = 0) -> Path:
    """Write `num_cases` phantom CTs as a Task03_Liver-like MSD folder at `root`."""
    return write_msd_dataset(
        root, name="LiverPhantom", description="Synthetic abdominal CT: liver and liver tumours",
        modality={0: "CT"}, labels=LABELS, cases=_liver_cases(num_cases, matrix, seed))


def ensure_liver_phantom(cache_root: str | Path, num_cases: int = 20, matrix: int = 128,
                         seed: int = 0) -> Path:
    """Return a cached phantom folder under `cache_root`, generating it on first use."""
    return ensure_dataset(cache_root, f"LiverPhantom_v{GENERATOR_VERSION}", write_liver_phantom,
                          num_cases=num_cases, matrix=matrix, seed=seed)

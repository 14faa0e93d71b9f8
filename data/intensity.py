"""Intensity normalisation: nnU-Net's CT scheme and per-image z-score for other modalities.

CT values are in Hounsfield units, comparable across scanners, so one set of statistics from the
training foreground serves every image: clip to the foreground's 0.5/99.5 percentiles (bone and
contrast outliers) then subtract the foreground mean and divide by its standard deviation. MRI
intensities have no absolute scale, so each image is z-scored on its own: inside the non-zero mask
when the data set's images have a background of exact zeros (skull-stripped or cropped scans), else
over the whole image, decided once per data set as nnU-Net does (`uses_nonzero_mask`).
"""

import numpy as np
from scipy import ndimage

CT_PERCENTILES = (0.5, 99.5)


def sample_foreground(channel: np.ndarray, label: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Intensities of up to `num_samples` labelled voxels (all of them when fewer).

    Args:
        channel: (Z, Y, X) image channel.
        label: (Z, Y, X) class indices; voxels with label > 0 are foreground.

    Returns:
        (N,) float32 intensities.
    """
    values = channel[label > 0]
    if values.size > num_samples:
        values = rng.choice(values, size=num_samples, replace=False)
    return values.astype(np.float32)


def ct_statistics(foreground: np.ndarray) -> dict[str, float]:
    """Clip range and mean/std of foreground CT intensities, as nnU-Net computes them.

    Mean and standard deviation are of the unclipped samples, exactly as in nnU-Net, so that
    plans and results stay comparable with it.
    """
    if foreground.size == 0:
        raise ValueError("no foreground voxels in the training cases: CT statistics need labelled voxels.")
    lower, upper = np.percentile(foreground.astype(np.float64), CT_PERCENTILES)
    return {
        "lower": float(lower),
        "upper": float(upper),
        "mean": float(np.mean(foreground, dtype=np.float64)),
        "std": float(np.std(foreground, dtype=np.float64)),
    }


def normalize_ct(channel: np.ndarray, statistics: dict[str, float]) -> np.ndarray:
    """Clip to the foreground percentiles, then z-score with the foreground mean/std.

    Args:
        channel: (Z, Y, X) Hounsfield units.
        statistics: output of `ct_statistics`.
    """
    clipped = np.clip(channel, statistics["lower"], statistics["upper"])
    return ((clipped - statistics["mean"]) / max(statistics["std"], 1e-8)).astype(np.float32)


def normalize_zscore(channel: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score inside `mask`, with 0 (the mean) outside it; over the whole image without one.

    Args:
        channel: (Z, Y, X) intensities.
        mask: (Z, Y, X) bool from `nonzero_mask`, or None (also when empty) for the whole image.
    """
    if mask is None or not mask.any():
        mask = np.ones(channel.shape, dtype=bool)
    values = channel[mask]
    normalized = np.zeros(channel.shape, dtype=np.float32)
    normalized[mask] = (values - values.mean()) / max(float(values.std()), 1e-8)
    return normalized


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: voxels non-zero in any channel of a (C, Z, Y, X) image, with enclosed holes
    filled as nnU-Net's crop does, so a zero inside the body (a dark vessel, air in the bowel) is
    normalised with the body instead of being set to its mean."""
    return ndimage.binary_fill_holes(np.any(image != 0, axis=0))


def nonzero_box_share(image: np.ndarray) -> float:
    """Share of the voxels of a (C, Z, Y, X) image inside the bounding box of its non-zero voxels:
    nnU-Net's relative size after cropping to the non-zero region. 1.0 for an all-zero image,
    which shows no background to crop."""
    box = ndimage.find_objects(np.any(image != 0, axis=0).astype(np.uint8))
    if not box or box[0] is None:
        return 1.0
    return float(np.prod([part.stop - part.start for part in box[0]]) / np.prod(image.shape[1:]))


def uses_nonzero_mask(box_shares: list[float]) -> bool:
    """Whether a data set's z-scored channels use the non-zero mask, from `nonzero_box_share` per case.

    nnU-Net's rule: only when cropping to the non-zero region shrinks the median case below 3/4 of
    its size. Then the zeros are a background written by the scanner or a skull-stripping tool, and
    scoring inside the mask keeps that empty space from weighing on the statistics. Otherwise zeros
    are just dark tissue: inside-mask statistics would map a raw 0 to the body mean while raw 1..3
    fall far below it, so the whole image is z-scored.
    """
    return bool(np.median(box_shares) < 0.75)


def ct_window_statistics(lower: float, upper: float) -> dict[str, float]:
    """Statistics for `normalize_ct` that apply a fixed Hounsfield window instead of the dataset's
    foreground percentiles: clip to [lower, upper] and map the window linearly onto [-1, 1].

    A fixed window (e.g. the lung window -1000..400) keeps the contrast a radiologist reads with,
    where the foreground statistics of a small finding would clip away its surroundings.
    """
    if not upper > lower:
        raise ValueError(f"a Hounsfield window needs upper > lower, got {lower}..{upper}")
    return {"lower": float(lower), "upper": float(upper), "mean": (lower + upper) / 2, "std": (upper - lower) / 2}

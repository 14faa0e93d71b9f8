"""Intensity normalisation: nnU-Net's CT scheme and per-image z-score for other modalities.

CT values are in Hounsfield units, comparable across scanners, so one set of statistics from the
training foreground serves every image: clip to the foreground's 0.5/99.5 percentiles (bone and
contrast outliers) then subtract the foreground mean and divide by its standard deviation. MRI
intensities have no absolute scale, so each image is z-scored on its own, inside the body mask.
"""

import numpy as np

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


def normalize_zscore(channel: np.ndarray, body_mask: np.ndarray) -> np.ndarray:
    """Z-score inside the body mask; outside it is set to 0 (the body mean).

    Args:
        channel: (Z, Y, X) intensities.
        body_mask: (Z, Y, X) bool; an empty mask means the whole image.
    """
    mask = body_mask if body_mask.any() else np.ones_like(body_mask)
    values = channel[mask]
    normalized = np.zeros(channel.shape, dtype=np.float32)
    normalized[mask] = (values - values.mean()) / max(float(values.std()), 1e-8)
    return normalized


def ct_window_statistics(lower: float, upper: float) -> dict[str, float]:
    """Statistics for `normalize_ct` that apply a fixed Hounsfield window instead of the dataset's
    foreground percentiles: clip to [lower, upper] and map the window linearly onto [-1, 1].

    A fixed window (e.g. the lung window -1000..400) keeps the contrast a radiologist reads with,
    where the foreground statistics of a small finding would clip away its surroundings.
    """
    if not upper > lower:
        raise ValueError(f"a Hounsfield window needs upper > lower, got {lower}..{upper}")
    return {"lower": float(lower), "upper": float(upper), "mean": (lower + upper) / 2, "std": (upper - lower) / 2}

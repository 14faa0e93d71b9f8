"""Post-processing of predicted label maps."""

import numpy as np
from scipy import ndimage


def keep_largest_foreground(label_map: np.ndarray) -> np.ndarray:
    """Keep the largest 3D connected component of the foreground (all classes together, 26-connected)
    and set everything outside it to background.

    For an organ with findings inside it (liver and its tumours) islands away from the organ are false
    positives (the spleen, which looks like liver); tumours touching or inside the liver survive.
    Do not use it where a class comes in separate pieces (lung nodules, both kidneys).
    """
    components, count = ndimage.label(label_map > 0, structure=np.ones((3, 3, 3)))
    if count <= 1:
        return label_map
    sizes = np.bincount(components.ravel())[1:]
    return np.where(components == np.argmax(sizes) + 1, label_map, 0).astype(label_map.dtype)


def keep_largest_component_per_class(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep, per foreground class, only its largest 3D connected component (26-connectivity).

    For one organ (the left atrium) stray islands are false positives; do not use it for findings
    that come several per patient (lung nodules).
    """
    result = np.array(label_map, copy=True)
    for k in range(1, max(num_classes, 2)):
        components, count = ndimage.label(label_map == k, structure=np.ones((3, 3, 3)))
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            result[(components > 0) & (components != np.argmax(sizes) + 1)] = 0
    return result


def largest_foreground_share(label_map: np.ndarray) -> float:
    """Share of the foreground voxels (all classes together) in the largest 26-connected piece; 1.0
    for a map without foreground. Close to 1 in every training label: the target is one connected
    structure, and `keep_largest_foreground` removes only false positives."""
    components, count = ndimage.label(np.asarray(label_map) > 0, structure=np.ones((3, 3, 3)))
    if count == 0:
        return 1.0
    sizes = np.bincount(components.ravel())[1:]
    return float(sizes.max() / sizes.sum())

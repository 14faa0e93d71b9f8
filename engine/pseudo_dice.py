"""Pseudo-Dice: a cheap validation figure to follow training with, from fixed validation patches.

The whole-volume validation (every case predicted with a sliding window, then HD95 and NSD on the CPU)
takes many minutes on a large task, and under torchrun the other processes would wait for it. As in
nnU-Net, the periodic validation is cheaper and measures less: a fixed, seeded set of patches of the
validation cases (half centred on foreground, like the training patches) is predicted in single
forward passes, without sliding window, mirroring or post-processing, and each class's Dice is
2 TP / (2 TP + FP + FN) with the voxel counts summed over all patches. Pooled over patches, large
structures weigh more than in a mean of per-case Dice, and no voxel sees more context than one patch,
so the figure is not comparable with the whole-volume Dice: the recipes log it as ``pseudo_dice_*``,
pick ``best.pt`` by it, and report the whole-volume Dice from the final validation.

Under torchrun each process predicts its share of the patches and the counts are summed with one
all-reduce that every process makes, so no process idles and the figure does not depend on the
number of processes.

    patches = draw_validation_patches(entry, val_ids, patch_size=(128, 128, 128), patches_per_case=4, seed=0)
    share = read_validation_patches(entry, patches[rank::world_size], patch_size=(128, 128, 128))
    dice = pseudo_dice(model, share, num_classes=3, device=device, amp_dtype=None, batch_size=4)  # {1: .., 2: ..}
"""

import itertools
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.augment3d import SpatialTransformParams, apply_spatial_transform
from data.patches import sample_patch_center
from data.preprocess import load_preprocessed_case
from engine.inference import copy_to_device


@dataclass(frozen=True)
class ValidationPatch:
    """Where one validation patch lies: its case and its centre voxel (z, y, x) on the preprocessed grid."""

    case_id: str
    center: tuple[int, int, int]


def draw_validation_patches(entry: str | Path, case_ids: list[str], *, patch_size: tuple[int, int, int],
                            patches_per_case: int, seed: int) -> list[ValidationPatch]:
    """A fixed set of patches per case: the 1st, 3rd, ... centred on a foreground voxel (of a class
    drawn uniformly among those present, as in training), the others anywhere in the volume.

    Each case's generator is seeded by (seed, case id), so a case gets the same patches whatever the
    other validation cases, and every process draws the same list.
    """
    patches = []
    for case_id in case_ids:
        case = load_preprocessed_case(entry, case_id)
        rng = np.random.default_rng([seed, zlib.crc32(case_id.encode())])
        for index in range(patches_per_case):
            foreground_probability = 1.0 if index % 2 == 0 else 0.0
            center = sample_patch_center(rng, case.label.shape, case.foreground, foreground_probability, patch_size)
            patches.append(ValidationPatch(case_id, tuple(int(value) for value in center)))
    return patches


def read_validation_patches(entry: str | Path, patches: Iterable[ValidationPatch], *,
                            patch_size: tuple[int, int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Image (C, *patch_size) float32 and label (*patch_size) uint8 of each patch, cut from the cache
    without augmentation; outside the volume each channel's minimum and background, as in training."""
    for case_id, same_case in itertools.groupby(patches, key=lambda patch: patch.case_id):
        case = load_preprocessed_case(entry, case_id)
        channel_min = np.asarray(case.properties["channel_min"], dtype=np.float32).reshape(case.image.shape[0])
        for patch in same_case:
            yield apply_spatial_transform(case.image, case.label, center=np.asarray(patch.center),
                                          patch_size=patch_size, params=SpatialTransformParams(),
                                          channel_min=channel_min)


def count_overlaps(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K - 1, 3) int64: true positive, false positive and false negative voxels of each foreground
    class 1 .. K - 1 between two label maps of the same shape."""
    counts = []
    for k in range(1, num_classes):
        predicted, reference = prediction == k, label == k
        true_positives = (predicted & reference).sum()
        counts.append(torch.stack([true_positives, predicted.sum() - true_positives,
                                   reference.sum() - true_positives]))
    return torch.stack(counts)


def dice_from_counts(counts: torch.Tensor) -> dict[int, float]:
    """{class: 2 TP / (2 TP + FP + FN)} from `count_overlaps` rows; a class absent from both the
    references and the predictions scores 1.0, as in `engine.metrics.dice_per_class`."""
    dice = {}
    for k, (true_positives, false_positives, false_negatives) in enumerate(counts.tolist(), start=1):
        denominator = 2 * true_positives + false_positives + false_negatives
        dice[k] = 1.0 if denominator == 0 else 2 * true_positives / denominator
    return dice


@torch.inference_mode()
def pseudo_dice(model, patches: Iterable[tuple[np.ndarray, np.ndarray]], *, num_classes: int,
                device: torch.device, amp_dtype: torch.dtype | None, batch_size: int) -> dict[int, float]:
    """Dice per foreground class from the voxel counts of every patch, summed over the processes.

    Under torchrun every process must call it (with its share of the patches, possibly none): the
    counts are all-reduced once at the end.

    Args:
        model: maps (B, C, *patch) to logits (B, num_classes, *patch).
        patches: (image (C, *patch), label (*patch)) pairs, e.g. from `read_validation_patches`.
        num_classes: model outputs K; 1 means one sigmoid logit (foreground where it is > 0).
        amp_dtype: autocast dtype, None for full precision.
        batch_size: patches per forward pass.

    Returns:
        {class: Dice} for classes 1 .. max(K, 2) - 1.
    """
    model.eval()
    label_classes = max(num_classes, 2)
    counts = torch.zeros((label_classes - 1, 3), dtype=torch.int64, device=device)
    patches = iter(patches)
    while batch := list(itertools.islice(patches, batch_size)):
        images = copy_to_device(torch.from_numpy(np.stack([image for image, _ in batch])), device)
        labels = copy_to_device(torch.from_numpy(np.stack([label for _, label in batch])), device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)  # (B, K, *patch)
        prediction = logits[:, 0] > 0 if num_classes == 1 else logits.argmax(1)
        counts += count_overlaps(prediction.long(), labels.long(), label_classes)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return dice_from_counts(counts.cpu())

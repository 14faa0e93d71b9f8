import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from data.msd import read_msd_dataset
from data.preprocess import load_preprocessed_case, plan_preprocessing, preprocess_dataset
from data.synthetic.msd_layout import write_msd_dataset
from engine.pseudo_dice import (
    count_overlaps,
    dice_from_counts,
    draw_validation_patches,
    pseudo_dice,
    read_validation_patches,
)
from models import UNet

PATCH = (5, 7, 9)


class ClassFromImage(torch.nn.Module):
    """Predicts the class written in the image's first channel: the prediction is set by the test."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        classes = image[:, 0].round().long()
        return torch.nn.functional.one_hot(classes, self.num_classes).movedim(-1, 1).float() * 10


def constructed_patches() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three patches whose liver (1) and cancer (2) overlaps are counted by hand below."""
    first_prediction, first_label = np.zeros(PATCH, np.float32), np.zeros(PATCH, np.uint8)
    first_label[0:3, 0:4, 0:5] = 1  # 60 voxels
    first_prediction[1:3, 0:4, 0:5] = 1  # 40 of them: 40 TP, 20 FN
    first_prediction[4, 6, 8] = 2  # cancer where there is none: 1 FP
    second_prediction, second_label = np.zeros(PATCH, np.float32), np.zeros(PATCH, np.uint8)
    second_label[:, :, 0:2] = 1  # 70 voxels
    second_prediction[:, :, 0:3] = 1  # 105 voxels: 70 TP, 35 FP
    second_label[2, 3, 4:6] = 2  # 2 voxels
    second_prediction[2, 3, 4] = 2  # 1 TP, 1 FN
    empty = np.zeros(PATCH, np.float32), np.zeros(PATCH, np.uint8)  # nothing to find, nothing found
    return [(first_prediction[None], first_label), (second_prediction[None], second_label),
            (empty[0][None], empty[1])]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_pseudo_dice_pools_the_voxel_counts_of_every_patch(batch_size):
    dice = pseudo_dice(ClassFromImage(3), constructed_patches(), num_classes=3, device=torch.device("cpu"),
                       amp_dtype=None, batch_size=batch_size)
    # liver: TP 40 + 70, FP 35, FN 20; cancer: TP 1, FP 1, FN 1.
    assert dice == {1: pytest.approx(2 * 110 / (2 * 110 + 35 + 20)), 2: pytest.approx(2 / 4)}
    # Pooled, not the mean over patches: the first patch alone has no cancer to find and scores 0.
    first = pseudo_dice(ClassFromImage(3), constructed_patches()[:1], num_classes=3, device=torch.device("cpu"),
                        amp_dtype=None, batch_size=1)
    assert first == {1: pytest.approx(80 / 100), 2: 0.0}


def test_single_logit_model_is_foreground_where_the_logit_is_positive():
    image = np.zeros((1, *PATCH), np.float32)
    image[0, :2] = 1.0  # logit 1 (> 0) in the first two slices, -1 elsewhere
    label = np.zeros(PATCH, np.uint8)
    label[1:4] = 1
    model = torch.nn.Conv3d(1, 1, kernel_size=1)
    torch.nn.init.constant_(model.weight, 2.0)
    torch.nn.init.constant_(model.bias, -1.0)
    dice = pseudo_dice(model, [(image, label)], num_classes=1, device=torch.device("cpu"), amp_dtype=None,
                       batch_size=1)
    # TP one slice, FP one slice, FN two slices.
    assert dice == {1: pytest.approx(2 / (2 + 1 + 2))}


def test_count_overlaps_and_empty_classes():
    prediction = torch.tensor([[0, 1, 1, 2]])
    label = torch.tensor([[0, 1, 2, 2]])
    counts = count_overlaps(prediction, label, 4)
    assert counts.tolist() == [[1, 1, 0], [1, 0, 1], [0, 0, 0]]
    assert dice_from_counts(counts) == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def score_share(rank, model, patches, rendezvous, results):
    """One torchrun-like process: its share of the patches, then the all-reduce.

    Forked from pytest, whose OpenMP thread pool has already started: a forked child's first parallel region
    waits for pool threads that did not survive the fork, so the child runs on one thread, as DataLoader
    workers do."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        dice = pseudo_dice(model, patches[rank::2], num_classes=3, device=torch.device("cpu"), amp_dtype=None,
                           batch_size=1)
    finally:
        dist.destroy_process_group()
    (results / f"rank{rank}.json").write_text(json.dumps(dice))


@pytest.mark.slow  # two gloo processes
def test_two_gloo_processes_give_the_figure_of_one(tmp_path):
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=4, depth=2).eval()
    rng = np.random.default_rng(0)
    patches = []
    for _ in range(7):  # uneven shares: 4 and 3 patches
        label = np.zeros(PATCH, np.uint8)
        label[1:4, 1:6, rng.integers(0, 4):] = 1
        label[2, 2:4, 3:5] = 2
        image = (rng.normal(size=(1, *PATCH)) + 2 * label).astype(np.float32)
        patches.append((image, label))
    expected = pseudo_dice(model, patches, num_classes=3, device=torch.device("cpu"), amp_dtype=None, batch_size=1)
    halves = [pseudo_dice(model, patches[rank::2], num_classes=3, device=torch.device("cpu"), amp_dtype=None,
                          batch_size=1) for rank in range(2)]
    assert halves[0] != expected and halves[1] != expected  # so the all-reduce has something to do

    torch.multiprocessing.start_processes(score_share, args=(model, patches, tmp_path / "rendezvous", tmp_path),
                                          nprocs=2, start_method="fork")
    for rank in range(2):
        figures = {int(k): v for k, v in json.loads((tmp_path / f"rank{rank}.json").read_text()).items()}
        assert figures == expected


@pytest.fixture(scope="module")
def cache_entry(tmp_path_factory):
    """Two small preprocessed cases: one with liver and cancer, one without foreground."""
    root = tmp_path_factory.mktemp("task")
    rng = np.random.default_rng(0)
    cases = []
    for case_id, has_foreground in (("liver_0", True), ("liver_1", False)):
        label = np.zeros((21, 19, 13), np.uint8)
        if has_foreground:
            label[3:9, 4:12, 2:7] = 1
            label[5:7, 6:8, 3:5] = 2
        image = rng.normal(0, 20, label.shape).astype(np.float32) + 100 * label
        cases.append((case_id, image, label, np.diag([1.5, 1.5, 2.0, 1.0])))
    write_msd_dataset(root / "Task03", name="Liver", description="test", modality={0: "CT"},
                      labels={0: "background", 1: "liver", 2: "cancer"}, cases=cases)
    dataset = read_msd_dataset(root / "Task03")
    case_ids = [case.case_id for case in dataset.cases]
    plan = plan_preprocessing(dataset, case_ids, target_spacing=(2.0, 1.5, 1.5), workers=1)
    return preprocess_dataset(dataset, plan, root / "cache", case_ids, workers=1)


def test_validation_patches_are_fixed_per_case_and_half_centred_on_foreground(cache_entry):
    patches = draw_validation_patches(cache_entry, ["liver_0", "liver_1"], patch_size=PATCH, patches_per_case=5,
                                      seed=3)
    assert patches == draw_validation_patches(cache_entry, ["liver_0", "liver_1"], patch_size=PATCH,
                                              patches_per_case=5, seed=3)
    # A case's patches do not depend on the other validation cases.
    assert patches[5:] == draw_validation_patches(cache_entry, ["liver_1"], patch_size=PATCH, patches_per_case=5,
                                                  seed=3)
    assert [patch.case_id for patch in patches] == ["liver_0"] * 5 + ["liver_1"] * 5
    label = np.asarray(load_preprocessed_case(cache_entry, "liver_0").label)
    centred = [label[patch.center] > 0 for patch in patches[:5]]
    assert centred[0] and centred[2] and centred[4]  # the 1st, 3rd and 5th on foreground
    for patch in patches:
        shape = load_preprocessed_case(cache_entry, patch.case_id).label.shape
        assert all(0 <= c < s for c, s in zip(patch.center, shape))


def test_read_validation_patches_cuts_image_and_label_like_training(cache_entry):
    patches = draw_validation_patches(cache_entry, ["liver_0", "liver_1"], patch_size=PATCH, patches_per_case=2,
                                      seed=0)
    pairs = list(read_validation_patches(cache_entry, patches, patch_size=PATCH))
    assert len(pairs) == 4
    for (image, label), patch in zip(pairs, patches):
        assert image.shape == (1, *PATCH) and image.dtype == np.float32
        assert label.shape == PATCH and label.dtype == np.uint8
        case = load_preprocessed_case(cache_entry, patch.case_id)
        centre = tuple(size // 2 for size in PATCH)
        assert label[centre] == case.label[patch.center]
        np.testing.assert_allclose(image[(0, *centre)], case.image[(0, *patch.center)])
    assert pairs[0][1].any()  # the first patch of the case with foreground holds some

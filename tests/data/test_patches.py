import dataclasses
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.augment3d import Augment3DConfig
from data.patches import PatchDataset, sample_patch_center
from data.samplers import EpochSampler


def _write_case(cache_dir, case_id, image, label, channel_min, num_locations=10_000, seed=0):
    """Write one case in the cache layout; foreground lists sampled like the real cache."""
    rng = np.random.default_rng(seed)
    np.save(cache_dir / f"{case_id}_image.npy", image.astype(np.float32))
    np.save(cache_dir / f"{case_id}_label.npy", label.astype(np.uint8))
    foreground = {}
    for class_index in range(1, 3):
        locations = np.argwhere(label == class_index).astype(np.int32)
        if len(locations) > num_locations:
            locations = locations[rng.choice(len(locations), num_locations, replace=False)]
        foreground[f"class_{class_index}"] = locations.reshape(-1, 3)
    np.savez(cache_dir / f"{case_id}_foreground.npz", **foreground)
    (cache_dir / f"{case_id}.json").write_text(json.dumps({"channel_min": list(map(float, channel_min))}))


def _random_case(shape, seed):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    image[1] += 5.0
    label = np.zeros(shape, dtype=np.uint8)
    label[shape[0] // 3 : shape[0] // 2, 4:12, 5:15] = 1
    label[-6:-2, -9:-3, 2:7] = 2
    return image, label


CASE_IDS = ("case_0", "case_1", "case_2")


@pytest.fixture
def cache_dir(tmp_path):
    for index, shape in enumerate([(23, 31, 37), (19, 29, 27), (9, 13, 11)]):
        image, label = _random_case(shape, seed=index)
        _write_case(tmp_path, f"case_{index}", image, label, image.reshape(2, -1).min(axis=1))
    return tmp_path


def _dataset(cache_dir, augment=None, patch_size=(9, 15, 13), case_ids=CASE_IDS, foreground_share=0.5):
    augment = augment if augment is not None else Augment3DConfig()
    return PatchDataset(cache_dir, list(case_ids), patch_size=patch_size, samples_per_epoch=8,
                        foreground_share=foreground_share, augment=augment, seed=7)


def test_foreground_centres_come_at_the_configured_rate():
    shape = (21, 37, 43)
    rng = np.random.default_rng(0)
    label = rng.uniform(size=shape) < 0.01
    foreground = {1: np.argwhere(label).astype(np.int32), 2: np.zeros((0, 3), dtype=np.int32)}
    draws = 3000
    centers = np.array([sample_patch_center(rng, shape, foreground, 0.33) for _ in range(draws)])
    assert centers.dtype == np.int64 and centers.shape == (draws, 3)
    assert np.all((centers >= 0) & (centers < np.asarray(shape)))
    on_foreground = label[tuple(centers.T)].mean()
    expected = 0.33 + 0.67 * label.mean()
    assert abs(on_foreground - expected) < 4 * np.sqrt(expected * (1 - expected) / draws)


def test_foreground_classes_are_drawn_evenly_and_empty_classes_never():
    rng = np.random.default_rng(1)
    shape = (11, 13, 15)
    foreground = {
        1: np.argwhere(np.ones(shape, dtype=bool))[:500].astype(np.int32),  # large class
        2: np.array([[3, 4, 5]], dtype=np.int32),  # one voxel
        3: np.zeros((0, 3), dtype=np.int32),
    }
    centers = [tuple(sample_patch_center(rng, shape, foreground, 1.0)) for _ in range(1000)]
    assert 400 < centers.count((3, 4, 5)) < 600


def test_random_centres_keep_the_patch_inside_or_centre_the_volume():
    rng = np.random.default_rng(2)
    shape, patch_size = (9, 40, 33), (15, 17, 33)
    centers = np.array([sample_patch_center(rng, shape, {}, 0.9, patch_size) for _ in range(500)])
    start = centers - np.asarray(patch_size) // 2
    assert np.all(start[:, 0] == -3)  # patch 15 around a volume of 9: 3 voxels of padding each side
    assert start[:, 1].min() == 0 and start[:, 1].max() == 40 - 17  # every position is reached
    assert np.all(start[:, 2] == 0)


def test_same_key_same_sample_and_new_epoch_new_sample(cache_dir):
    dataset = _dataset(cache_dir)
    first, again = dataset[(0, 3)], dataset[(0, 3)]
    assert first["image"].dtype == torch.float32 and first["image"].shape == (2, 9, 15, 13)
    assert first["label"].dtype == torch.uint8 and first["label"].shape == (9, 15, 13)
    assert first["image"].is_contiguous() and first["label"].is_contiguous()
    torch.testing.assert_close(first["image"], again["image"], rtol=0, atol=0)
    torch.testing.assert_close(first["label"], again["label"], rtol=0, atol=0)
    assert not torch.equal(first["image"], dataset[(1, 3)]["image"])
    assert not torch.equal(first["image"], dataset[(0, 4)]["image"])
    # a fresh dataset (a resumed run) reproduces the sample
    torch.testing.assert_close(_dataset(cache_dir)[(0, 3)]["image"], first["image"], rtol=0, atol=0)


def test_plain_patches_are_padded_crops_of_the_cached_case(tmp_path):
    # the image holds each voxel's flat index, so a patch shows exactly where it came from
    shape = (15, 21, 19)
    flat_index = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    label = (np.random.default_rng(0).uniform(size=shape) < 0.1).astype(np.uint8)
    _write_case(tmp_path, "indexed", flat_index, label, [-1.0])
    dataset = _dataset(tmp_path, Augment3DConfig.none(), patch_size=(9, 25, 13), case_ids=("indexed",))
    for index in range(6):
        sample = dataset[(0, index)]
        patch_image, patch_label = sample["image"][0].numpy(), sample["label"].numpy()
        inside = patch_image >= 0
        assert inside.any() and not inside.all()  # patch 25 > volume 21 along y: always padded
        source = np.unravel_index(patch_image[inside].astype(np.int64), shape)
        np.testing.assert_array_equal(patch_label[inside], label[source])
        assert np.all(patch_label[~inside] == 0)
        # a crop, not a shuffle: neighbours in the patch are neighbours in the volume
        for axis, stride in enumerate([shape[1] * shape[2], shape[2], 1]):
            both_inside = (np.diff(inside.astype(np.int8), axis=axis) == 0) & np.delete(inside, 0, axis=axis)
            assert np.all(np.diff(patch_image, axis=axis)[both_inside] == stride)


def test_patch_larger_than_the_volume_is_padded(cache_dir):
    plain = Augment3DConfig.none()
    dataset = _dataset(cache_dir, plain, patch_size=(13, 17, 15), case_ids=("case_2",), foreground_share=0.0)
    image = np.load(cache_dir / "case_2_image.npy")  # (2, 9, 13, 11): centred, 2 voxels of padding
    sample = dataset[(0, 0)]
    patch_image, patch_label = sample["image"].numpy(), sample["label"].numpy()
    inside = (slice(2, 11), slice(2, 15), slice(2, 13))
    np.testing.assert_array_equal(patch_image[(slice(None), *inside)], image)
    np.testing.assert_array_equal(patch_label[inside], np.load(cache_dir / "case_2_label.npy"))
    padding = np.ones((13, 17, 15), dtype=bool)
    padding[inside] = False
    np.testing.assert_array_equal(patch_image[0][padding], image[0].min())
    np.testing.assert_array_equal(patch_image[1][padding], image[1].min())
    assert np.all(patch_label[padding] == 0)


def test_dataset_pickles_without_its_memmaps(cache_dir):
    dataset = _dataset(cache_dir)
    sample = dataset[(2, 5)]
    restored = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 10_000
    torch.testing.assert_close(restored[(2, 5)]["image"], sample["image"], rtol=0, atol=0)


def test_integer_keys_are_refused(cache_dir):
    with pytest.raises(TypeError, match="EpochSampler"):
        _dataset(cache_dir)[3]


@pytest.mark.slow  # two spawned worker processes
def test_spawned_workers_give_the_same_batches_as_the_main_process(cache_dir):
    augment = dataclasses.replace(Augment3DConfig(), p_rotation=0.5, p_elastic=0.3)
    dataset = _dataset(cache_dir, augment)
    sampler = EpochSampler(3, 3)
    sampler.set_epoch(2)
    serial = list(DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=0))
    loader = DataLoader(
        dataset, batch_size=3, sampler=sampler, num_workers=2, multiprocessing_context="spawn", persistent_workers=True
    )
    parallel = list(loader)
    assert len(serial) == len(parallel) == 3
    for expected, batch in zip(serial, parallel):
        torch.testing.assert_close(batch["image"], expected["image"], rtol=0, atol=0)
        torch.testing.assert_close(batch["label"], expected["label"], rtol=0, atol=0)
    # persistent workers see the next epoch through the keys alone
    sampler.set_epoch(3)
    next_epoch = list(loader)
    assert not torch.equal(next_epoch[0]["image"], parallel[0]["image"])
    torch.testing.assert_close(next_epoch[0]["image"][0], dataset[(3, 0)]["image"], rtol=0, atol=0)


def test_one_process_draws_the_keys_and_patches_it_always_drew(cache_dir):
    # The published figures of the synthetic default come from these patches: they must not move.
    # The digest was taken from the per-sample keys (epoch, 0 .. steps x batch - 1) and plain crops
    # before the sampler learnt whole batches and per-batch foreground.
    sampler = EpochSampler(7, 3)
    digest = hashlib.sha256()
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert keys == [(epoch, index) for index in range(21)]
        dataset = PatchDataset(cache_dir, list(CASE_IDS), patch_size=(9, 15, 13), samples_per_epoch=21,
                               foreground_share=0.33, augment=Augment3DConfig.none(), seed=7)
        for key in keys[:12]:
            sample = dataset[key]
            digest.update(sample["label"].numpy().tobytes())
            digest.update(sample["image"].numpy().tobytes())
    assert digest.hexdigest() == "ea1f65eb984d52e49e1d87df0f0d7ecdd02b6ba2d511846ff62640ff303e15b1"


def test_per_batch_keys_put_one_foreground_centre_in_every_batch_of_two_where_per_sample_leaves_none(tmp_path):
    # One foreground voxel in the volume: a patch is centred on it when, and only when, it was chosen
    # as a foreground centre (a random centre lands on it with probability 1/9975).
    shape = (19, 21, 25)
    label = np.zeros(shape, dtype=np.uint8)
    label[9, 11, 12] = 1
    _write_case(tmp_path, "dot", np.random.default_rng(0).standard_normal((1, *shape)), label, [-5.0])
    dataset = _dataset(tmp_path, Augment3DConfig.none(), patch_size=(5, 7, 9), case_ids=("dot",), foreground_share=0.33)
    center = (2, 3, 4)  # plain crops: the patch's middle voxel is the drawn centre

    def foreground_centred(keys):
        return [bool(dataset[key]["label"][center]) for key in keys]

    per_batch = foreground_centred(EpochSampler(40, 2, foreground_per_batch=round(2 * 0.33)))
    assert per_batch == [False, True] * 40  # the last patch of every batch
    per_sample = foreground_centred(EpochSampler(40, 2))
    without = sum(not (first or second) for first, second in zip(per_sample[::2], per_sample[1::2]))
    assert 8 <= without <= 28  # (1 - 0.33)^2 = 45% of the 40 batches on average
    # A flagged key is the patch an unflagged key draws at foreground_share 1 or 0: one stream for both modes.
    for foreground_share, flag in ((1.0, True), (0.0, False)):
        drawing = _dataset(tmp_path, Augment3DConfig.none(), patch_size=(5, 7, 9), case_ids=("dot",),
                           foreground_share=foreground_share)
        for index in range(5):
            torch.testing.assert_close(dataset[(1, index, flag)]["image"], drawing[(1, index)]["image"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="foreground_per_batch"):
        EpochSampler(4, 2, foreground_per_batch=3)

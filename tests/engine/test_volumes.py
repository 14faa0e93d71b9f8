"""The data step of the 2D recipes: a split by patient, reported in patients as well as cases."""

import json

import numpy as np
import pytest

from data.synthetic.msd_layout import write_msd_dataset
from engine.volumes import prepare_volumes


class RecordingLogger:
    def __init__(self):
        self.messages = []

    def info(self, message: str) -> None:
        self.messages.append(message)


def write_two_frame_task(root):
    """Six patients of two cardiac frames each, named as ACDC's: acdc_<patient>_f<frame>."""
    rng = np.random.default_rng(0)

    def cases():
        for patient in range(1, 7):
            for frame in (1, 2):
                image = rng.normal(100, 10, (13, 11, 5)).astype(np.float32)
                label = np.zeros((13, 11, 5), np.uint8)
                label[4:9, 3:8, 1:4] = 1
                yield f"acdc_{patient:03d}_f{frame:02d}", image, label, np.diag([1.5, 1.5, 10.0, 1.0])

    return write_msd_dataset(root, name="ACDC", description="two frames per patient", reference="",
                             modality={0: "MRI"}, labels={0: "background", 1: "left ventricle"}, cases=cases())


@pytest.mark.parametrize("fold", [None, 0, 3])
def test_the_two_frames_of_a_patient_stay_on_one_side_and_the_log_counts_patients(tmp_path, fold):
    root = write_two_frame_task(tmp_path / "ACDC")
    logger = RecordingLogger()
    _, _, _, train_ids, val_ids = prepare_volumes(
        root, tmp_path / "cache", logger, val_fraction=0.34, split_seed=12345, fold=fold,
        patient_pattern=r"(.+?)_f(?:rame)?\d+", splits_file=None, workers=1)
    patients = [{case_id[:-4] for case_id in ids} for ids in (train_ids, val_ids)]
    assert not patients[0] & patients[1]
    assert len(train_ids) + len(val_ids) == 12 and len(val_ids) == 2 * len(patients[1])
    assert any(f"{len(train_ids)} training / {len(val_ids)} validation cases "
               f"({len(patients[0])} / {len(patients[1])} patients)" in message for message in logger.messages)


def test_an_nnunet_splits_file_is_the_split_and_its_errors_are_named(tmp_path):
    root = write_two_frame_task(tmp_path / "ACDC")
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["acdc_001_f01", "acdc_002_f01"], "val": ["acdc_003_f02"]}]))
    _, _, _, train_ids, val_ids = prepare_volumes(
        root, tmp_path / "cache", RecordingLogger(), val_fraction=0.2, split_seed=12345, fold=0,
        patient_pattern="", splits_file=str(splits), workers=1)
    assert (train_ids, val_ids) == (["acdc_001_f01", "acdc_002_f01"], ["acdc_003_f02"])
    with pytest.raises(SystemExit, match="splits_final.json: holds folds 0..0; choose one with --fold"):
        prepare_volumes(root, tmp_path / "cache", RecordingLogger(), val_fraction=0.2, split_seed=12345, fold=None,
                        patient_pattern="", splits_file=str(splits), workers=1)

"""Predict new scans with trained checkpoints: segmentation masks (NIfTI) or pneumonia probabilities (DICOM).

    python predict.py --checkpoint runs/liver3d/best.pt --input /data/Task03_Liver/imagesTs --output preds/liver
    python predict.py --checkpoint runs/liver3d/best.pt --input ct.nii.gz --output preds --tta --keep-largest-component
    python predict.py --checkpoint runs/fold0/best.pt --checkpoint runs/fold1/best.pt --input scans/ --output preds
    python predict.py --checkpoint runs/atrium/best.pt --input mri/ --output preds/atrium --device cuda --amp false
    python predict.py --checkpoint runs/pneumonia/best.pt --input films/ --output preds/pneumonia

The checkpoint says what to do: its task picks the network (3D U-Net, 2D U-Net, ResNet18, rebuilt from
the training config), its preprocessing plan (or image size and normalisation) prepares each input
exactly as in training, and its threshold makes the pneumonia decision. Several checkpoints (one per
fold) of one task are an ensemble: their probabilities are averaged.

Segmentation (`.nii` / `.nii.gz`, one file or a folder): each case is preprocessed like the training
cases, predicted (3D: sliding window with the training patch and overlap; 2D: slice by slice, as in
validation), and written to OUTPUT under the input's own file name (`ct_2023.nii.gz` -> `ct_2023.nii.gz`)
with exactly the input file's shape and affine, beside a `<name>.png` montage and one row of
`volumes.csv` (millilitres per class), `<name>` being the file name without its extension.
With `--labels DIR` each case is also scored against its reference mask `DIR/<name>.nii.gz` (for an
input named `<case>_0000`, nnU-Net's channel file, `DIR/<case>.nii.gz` too) on the source grid (Dice,
HD95 and normalised surface Dice in mm, volume difference) into `scores.csv`, mean in the last row.
Chest X-ray (`.dcm`, one file or a folder): `predictions.csv` (file, patient id, probability, threshold,
decision) and a class activation map `cam/<file>.png` per image.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import pydicom
import torch
from torch import nn
from tqdm import tqdm

from data.msd import label_stems, nifti_stem
from data.nifti import Volume, read_nifti, write_nifti_like
from data.preprocess import PreprocessPlan, preprocess_image, restore_to_source
from data.rsna import decode_and_resize
from engine.cam import class_activation_maps, save_cam_overlay
from engine.checkpoint import load_checkpoint
from engine.config import parse_bool, rename_old_keys
from engine.evaluate import predict_volume
from engine.inference import average_over_flips, trained_flips
from engine.layout import resolve_memory_format, resolve_norm
from engine.metrics import dice_per_class
from engine.pictures import montage, save_montage
from engine.postprocess import keep_largest_component_per_class, keep_largest_foreground
from engine.runtime import has_fast_cpu_bf16, pick_device, resolve_amp_dtype
from engine.slicewise import num_outputs, predict_volume_slicewise
from engine.surface_metrics import surface_metrics_per_class
from models import UNet
from models.resnet import ResNet18Classifier

SEGMENTATION_TASKS = {"liver3d": 3, "atrium": 2, "lung": 2}  # task -> spatial dims of its U-Net
CLASSIFICATION_TASKS = ("pneumonia",)
# Settings that fix the grid and the windows a prediction is made on: an ensemble must share them.
SHARED_SETTINGS = {3: ("patch_size", "overlap"), 2: ("slice_axis", "image_size", "fit")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="RUN/best.pt",
                        help="checkpoint written by a train_*.py script; give it several times (e.g. one per "
                             "fold) to average the probabilities of checkpoints of one task")
    parser.add_argument("--input", required=True, metavar="PATH",
                        help="a .nii/.nii.gz file or a folder of them (segmentation tasks), or a DICOM file or "
                             "a folder of .dcm files (pneumonia); subfolders are not searched")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for the masks, montages and volumes.csv, or predictions.csv and cam/ "
                             "(created if missing; files of the same name are replaced)")
    parser.add_argument("--labels", metavar="DIR",
                        help="segmentation only: folder of reference masks named like the inputs (e.g. labelsTr/); "
                             "each case is scored (Dice, HD95 in mm, normalised surface Dice, volume difference) "
                             "on the source grid into scores.csv, with the mean over cases in its last row")
    parser.add_argument("--nsd-tolerance-mm", type=float, default=2.0, metavar="MM",
                        help="with --labels: boundary tolerance of the normalised surface Dice (default: 2)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time mirroring: average the predictions of every flip along the axes the "
                             "model was trained to flip (2^axes times slower; no effect on pneumonia)")
    parser.add_argument("--keep-largest-component", nargs="?", const=True, default=None, type=parse_bool,
                        metavar="BOOL",
                        help="keep the largest connected component: of the whole foreground for liver3d "
                             "(tumours inside the liver survive), of each class for atrium and lung "
                             "(default: as the checkpoint's validation did)")
    parser.add_argument("--window-batch-size", type=int, metavar="N",
                        help="3D only: sliding windows per forward pass (default: on a GPU about 2^23 voxels' "
                             "worth, e.g. 4 windows of 128^3, at most 32; 2 on a CPU); lower it if the GPU runs "
                             "out of memory")
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                        help="auto (cuda, then mps, then cpu), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--amp", nargs="?", const=True, default=None, type=parse_bool, metavar="BOOL",
                        help="mixed precision as in training (fp16 autocast on CUDA; bf16 on a CPU with native "
                             "bf16 kernels, else fp32); probabilities are averaged in float32 (default: the "
                             "checkpoint's --amp)")
    return parser


class ProbabilityAverage(nn.Module):
    """Several networks (each optionally mirrored) seen as one: the mean of their probabilities.

    It returns logits whose softmax (sigmoid for one output) is exactly the mean probability, so
    any code that predicts with one model (`predict_volume`, `predict_volume_slicewise`) predicts
    with the ensemble unchanged.

    Args:
        members: (model, mirror_axes) pairs; mirror_axes are spatial axes of the input to flip for
            test-time augmentation (every combination is predicted and averaged), () for none.
        num_outputs: K, the logit channels of every model; 1 means one sigmoid logit.

    Shapes:
        (B, C, *spatial) -> (B, K, *spatial) float32.
    """

    def __init__(self, members: list[tuple[nn.Module, tuple[int, ...]]], num_outputs: int):
        super().__init__()
        self.models = nn.ModuleList([model for model, _ in members])
        self.mirror_axes = [axes for _, axes in members]
        self.num_outputs = num_outputs

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        mean = sum(average_over_flips(model, image, self.num_outputs, axes)
                   for model, axes in zip(self.models, self.mirror_axes)) / len(self.models)
        if self.num_outputs == 1:
            return torch.logit(mean, eps=1e-6)
        # softmax(log p) = p because the mean probabilities already sum to one.
        return torch.log(mean.clamp_min(1e-12))


def load_checkpoints(paths: list[str]) -> tuple[str, list[dict]]:
    """Every checkpoint, checked to carry a known task and weights, and to share one task."""
    checkpoints = []
    for path in paths:
        checkpoint = load_checkpoint(Path(path))
        task = checkpoint.get("task")
        if task is None or "model" not in checkpoint:
            raise SystemExit(f"{path}: the checkpoint has no {'task' if task is None else 'model weights'}; it "
                             "was not written by a current train_*.py script. Pass RUN/best.pt or RUN/last.pt "
                             "of a run trained with this version.")
        if task not in SEGMENTATION_TASKS and task not in CLASSIFICATION_TASKS:
            raise SystemExit(f"{path}: unknown task {task!r}; predict.py knows "
                             f"{', '.join([*SEGMENTATION_TASKS, *CLASSIFICATION_TASKS])}.")
        # A run saved before a setting was renamed (e.g. "patch") is read under the current name.
        checkpoints.append({**checkpoint, "config": rename_old_keys(checkpoint.get("config", {}))})
    tasks = {path: checkpoint["task"] for path, checkpoint in zip(paths, checkpoints)}
    if len(set(tasks.values())) > 1:
        listing = ", ".join(f"{path} ({task})" for path, task in tasks.items())
        raise SystemExit(f"checkpoints of different tasks cannot be averaged: {listing}. Pass checkpoints "
                         "of the same task, e.g. the folds of one recipe, and predict each task separately.")
    return checkpoints[0]["task"], checkpoints


def find_inputs(path: Path, suffixes: tuple[str, ...], kind: str, any_file_name: bool = False) -> list[Path]:
    """The file itself, or the files of the folder ending in one of suffixes (macOS `._*` skipped).
    With any_file_name a single file is taken whatever its name (DICOM files often have no suffix)."""
    if path.is_file():
        if not any_file_name and not path.name.lower().endswith(suffixes):
            raise SystemExit(f"{path}: not a {kind} file ({' or '.join(suffixes)}), which is what this "
                             "checkpoint's task predicts. Pass a scan of that kind, or the checkpoint of its task.")
        return [path]
    if not path.is_dir():
        raise SystemExit(f"{path}: no such file or folder. Pass --input a {kind} file or a folder of them.")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.name.lower().endswith(suffixes) and not p.name.startswith("._"))
    if not files:
        raise SystemExit(f"{path}: no {kind} files ({' or '.join(suffixes)}) in this folder. Pass --input the "
                         f"folder that holds them (subfolders are not searched) or a single file.")
    return files


def check_shared_settings(checkpoints: list[dict], paths: list[str], spatial_dims: int) -> None:
    """Probabilities can only be averaged on one grid: same preprocessing plan and windows."""
    first = checkpoints[0]
    for path, checkpoint in zip(paths[1:], checkpoints[1:]):
        if checkpoint["plan"] != first["plan"]:
            raise SystemExit(f"{path}: its preprocessing plan differs from {paths[0]}'s (spacing, "
                             "normalisation or classes), so their probabilities lie on different grids. "
                             "Average only checkpoints trained on the same preprocessed data (the folds of one run).")
        for key in SHARED_SETTINGS[spatial_dims]:
            if list(np.atleast_1d(checkpoint["config"][key])) != list(np.atleast_1d(first["config"][key])):
                raise SystemExit(f"{path}: {key} {checkpoint['config'][key]} differs from "
                                 f"{first['config'][key]} in {paths[0]}; checkpoints averaged together "
                                 f"must share {', '.join(SHARED_SETTINGS[spatial_dims])}.")


def build_segmentation_model(checkpoint: dict, path: str, spatial_dims: int, plan: PreprocessPlan, *,
                             device: torch.device) -> UNet:
    """The U-Net with the constructor arguments its training script used, weights loaded, on
    ``device`` in its memory format. The strides and kernel sizes its config recorded are rebuilt
    (checkpoints written before they were recorded hold the uniform network: None); instance
    normalisation takes the device's kernel (engine/layout.py), which loads the same weights."""
    config = checkpoint["config"]
    model = UNet(spatial_dims=spatial_dims, in_channels=len(plan.channel_schemes),
                 num_classes=segmentation_outputs(spatial_dims, plan),
                 base_channels=config["base_channels"], depth=config["depth"],
                 max_channels=config["max_channels"], norm=resolve_norm(config["norm"], device),
                 upsample=config["upsample"], deep_supervision=config.get("deep_supervision", False),
                 strides=config.get("strides"), kernel_sizes=config.get("kernel_sizes"))
    load_weights(model, checkpoint, path)
    memory_format = resolve_memory_format(config.get("memory_format", "auto"), device, spatial_dims)
    return model.to(device, memory_format=memory_format)


def segmentation_outputs(spatial_dims: int, plan: PreprocessPlan) -> int:
    """Logits of the recipe's U-Net: one per class in 3D; in 2D one sigmoid logit for a single
    foreground class (engine/slicewise.py)."""
    return len(plan.labels) if spatial_dims == 3 else num_outputs(plan.labels)


def load_weights(model: nn.Module, checkpoint: dict, path: str) -> None:
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise SystemExit(f"{path}: the weights do not fit the network rebuilt from its config ({error}). "
                         "The checkpoint was edited or written by another version of the script.") from None


def volume_column(name: str) -> str:
    return name.strip().lower().replace(" ", "_") + "_ml"


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def score_case(mask: np.ndarray, image: Volume, *, labels_dir: Path, case_id: str, label_names: dict[int, str],
               tolerance_mm: float) -> dict[str, float]:
    """Dice, HD95, NSD and volume difference of each class of ``mask`` (on ``image``'s canonical
    grid) against ``labels_dir/<case_id>.nii[.gz]`` (or, for nnU-Net's ``<case>_0000``, against
    ``<case>.nii[.gz]``), with the source spacing."""
    candidates = [labels_dir / f"{stem}{suffix}" for stem in label_stems(case_id) for suffix in (".nii.gz", ".nii")]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise SystemExit(f"--labels {labels_dir}: no reference mask for case {case_id} "
                         f"({' or '.join(path.name for path in candidates[::2])}). "
                         "Name the masks like the inputs, or leave out --labels.")
    reference = read_nifti(found[0], is_label=True)
    if reference.array.shape != mask.shape or not np.allclose(reference.affine, image.affine, atol=1e-3):
        raise SystemExit(f"{found[0]}: its grid (shape {reference.source_shape}) differs from {image.path.name}'s; "
                         f"it is not the reference mask of case {case_id}.")
    num_classes = max(label_names) + 1
    dice = dice_per_class(mask, reference.array, num_classes)
    surface = surface_metrics_per_class(mask, reference.array, num_classes, reference.spacing, tolerance_mm)
    scores = {}
    for k in sorted(dice):
        name = label_names[k].strip().lower().replace(" ", "_")
        scores.update({f"dice_{name}": dice[k], f"hd95_{name}": surface[k]["hd95_mm"], f"nsd_{name}": surface[k]["nsd"],
                       f"volume_difference_ml_{name}": surface[k]["volume_difference_ml"]})
    return scores


def predict_segmentations(checkpoints: list[dict], paths: list[str], input_path: Path, output: Path, *, task: str,
                          tta: bool, keep_largest_component: bool, device: torch.device,
                          amp_dtype: torch.dtype | None, labels_dir: Path | None = None,
                          tolerance_mm: float = 2.0, window_batch_size: int | None = None) -> list[dict]:
    """Mask, montage and class volumes of every NIfTI case, and with ``labels_dir`` its scores;
    returns one dict per case. ``window_batch_size``: 3D windows per forward pass, None for
    `default_window_batch_size`."""
    spatial_dims = SEGMENTATION_TASKS[task]
    check_shared_settings(checkpoints, paths, spatial_dims)
    plan = PreprocessPlan.from_dict(checkpoints[0]["plan"])
    config = checkpoints[0]["config"]
    members = []
    for checkpoint, path in zip(checkpoints, paths):
        flips = trained_flips(checkpoint["config"].get("augment", {}), spatial_dims) if tta else ()
        if tta and not flips:
            tqdm.write(f"--tta: {path} was trained without flips, so it is not mirrored")
        members.append((build_segmentation_model(checkpoint, path, spatial_dims, plan, device=device).eval(), flips))
    outputs = segmentation_outputs(spatial_dims, plan)
    model = ProbabilityAverage(members, outputs)

    cases = find_inputs(input_path, (".nii", ".nii.gz"), "NIfTI")
    case_ids = [nifti_stem(case) for case in cases]
    repeated = sorted({case_id for case_id in case_ids if case_ids.count(case_id) > 1})
    if repeated:
        raise SystemExit(f"{input_path}: several files give the case name(s) {repeated} (.nii and .nii.gz); "
                         "their montages and table rows would overwrite each other. Rename or move the extra files.")
    output.mkdir(parents=True, exist_ok=True)
    inputs = {case.resolve() for case in cases}
    if any((output / case.name).resolve() in inputs for case in cases):
        raise SystemExit(f"{output}: writing the masks here would overwrite the input images. Choose another --output.")

    foreground = [k for k in sorted(plan.labels) if k > 0]
    rows = []
    for case, case_id in zip(tqdm(cases, desc="predict", unit="case"), case_ids):
        volume = read_nifti(case)
        image, properties = preprocess_image(volume, plan)  # (C, Z', Y', X') on the training grid
        if spatial_dims == 3:
            prediction = predict_volume(model, image, patch_size=tuple(config["patch_size"]), num_classes=outputs,
                                        device=device, amp_dtype=amp_dtype, overlap=config["overlap"],
                                        batch_size=window_batch_size)
        else:
            prediction = predict_volume_slicewise(model, image, axis=config["slice_axis"],
                                                  image_size=tuple(config["image_size"]), fit=config["fit"],
                                                  num_classes=outputs, device=device, amp_dtype=amp_dtype)
        if keep_largest_component:
            prediction = (keep_largest_foreground(prediction) if spatial_dims == 3
                          else keep_largest_component_per_class(prediction, len(plan.labels)))
        axis = config["slice_axis"] if spatial_dims == 2 else 0
        save_montage(montage(image, np.zeros_like(prediction), prediction, axis=axis), output / f"{case_id}.png")
        mask = restore_to_source(prediction, properties)  # (Z, Y, X) on the source's canonical grid
        write_nifti_like(mask, volume, output / case.name)
        voxel_ml = abs(np.linalg.det(volume.source_affine[:3, :3])) / 1000  # mm^3 -> mL, oblique affines too
        volumes = {plan.labels[k]: float(np.count_nonzero(mask == k) * voxel_ml) for k in foreground}
        rows.append({"case": case_id, "mask": output / case.name, "volumes_ml": volumes})
        if labels_dir is not None:
            rows[-1]["scores"] = score_case(mask, volume, labels_dir=labels_dir, case_id=case_id,
                                              label_names=plan.labels, tolerance_mm=tolerance_mm)
            write_scores(output / "scores.csv", rows)
        # Rewritten after every case, so a long batch stopped midway keeps the volumes of what it wrote.
        write_csv(output / "volumes.csv", ["case", *(volume_column(plan.labels[k]) for k in foreground)],
                  [[row["case"], *(f"{v:.6f}" for v in row["volumes_ml"].values())] for row in rows])
    return rows


def write_scores(path: Path, rows: list[dict]) -> None:
    """One row per scored case, then the mean over the cases (every figure is finite by the
    conventions of engine/metrics.py and engine/surface_metrics.py, so the mean is too)."""
    names = list(rows[0]["scores"])
    table = [[row["case"], *(f"{row['scores'][name]:.6f}" for name in names)] for row in rows]
    table.append(["mean", *(f"{np.mean([row['scores'][name] for row in rows]):.6f}" for name in names)])
    write_csv(path, ["case", *names], table)


def film_size(checkpoint: dict) -> tuple[int, int]:
    """The (H, W) a classifier's films are resized to; checkpoints written when it was one int hold a square."""
    size = checkpoint["image_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def predict_radiographs(checkpoints: list[dict], paths: list[str], input_path: Path, output: Path, *,
                        device: torch.device, amp_dtype: torch.dtype | None) -> list[dict]:
    """Probability, decision and class activation map of every DICOM film; returns one dict per film."""
    image_size = film_size(checkpoints[0])
    for path, checkpoint in zip(paths[1:], checkpoints[1:]):
        if film_size(checkpoint) != image_size:
            raise SystemExit(f"{path}: image size {film_size(checkpoint)} differs from {image_size} in "
                             f"{paths[0]}; checkpoints averaged together must share it.")
    members = []
    for checkpoint, path in zip(checkpoints, paths):
        model = ResNet18Classifier(in_channels=1, num_classes=1,  # as train_pneumonia.py builds it
                                   output_stride=checkpoint["config"].get("output_stride", 32))
        load_weights(model, checkpoint, path)
        members.append((model.to(device).eval(), checkpoint["normalization"]))
    # Each checkpoint's threshold was chosen on its own validation split; the ensemble takes their mean.
    threshold = float(np.mean([checkpoint["threshold"] for checkpoint in checkpoints]))

    films = find_inputs(input_path, (".dcm",), "DICOM", any_file_name=True)
    rows = []
    for film in tqdm(films, desc="predict", unit="image"):
        pixels, _ = decode_and_resize(film, image_size)  # (H, W) uint8, windowed and resized as the training cache
        probabilities, cams = [], []
        for model, normalization in members:
            image = (torch.from_numpy(pixels).float()[None, None] - normalization["mean"]) / normalization["std"]
            image = image.to(device)  # (1, 1, H, W)
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logit = model(image)  # (1, 1)
            probabilities.append(torch.sigmoid(logit.float())[0, 0].item())
            cams.append(class_activation_maps(model, image)[0].cpu().numpy())  # (H, W)
        probability = float(np.mean(probabilities))
        decision = int(probability >= threshold)
        patient_id = str(pydicom.dcmread(film, stop_before_pixels=True).get("PatientID", ""))
        save_cam_overlay(output / "cam" / f"{film.stem}.png", pixels, np.mean(cams, axis=0),
                         caption=f"p {probability:.2f}  {'positive' if decision else 'negative'}")
        rows.append({"file": film.name, "patient_id": patient_id, "probability": probability,
                     "threshold": threshold, "decision": decision})
    output.mkdir(parents=True, exist_ok=True)
    write_csv(output / "predictions.csv", ["file", "patient_id", "probability", "threshold", "decision"],
              [[row["file"], row["patient_id"], f"{row['probability']:.6f}", f"{threshold:.6f}", row["decision"]]
               for row in rows])
    return rows


def main(argv: list[str]) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.window_batch_size is not None and args.window_batch_size < 1:
        parser.error(f"--window-batch-size {args.window_batch_size}: give at least 1 window per forward pass")
    task, checkpoints = load_checkpoints(args.checkpoint)
    device = pick_device(args.device)
    if device.type == "cuda":
        # Every forward has the same window shape, so cuDNN's autotuning pays off after the first.
        torch.backends.cudnn.benchmark = True
    trained = checkpoints[0]["config"]
    amp = trained.get("amp", False) if args.amp is None else args.amp
    amp_dtype = resolve_amp_dtype(device, amp, trained.get("amp_dtype", "auto"))
    if amp_dtype == torch.bfloat16 and device.type == "cpu" and not has_fast_cpu_bf16():
        tqdm.write("warning: this CPU has no native bf16 kernels, so bf16 autocast runs far slower than fp32 here")
    input_path, output = Path(args.input), Path(args.output)
    keep_largest_component = (bool(trained.get("keep_largest_component")) if args.keep_largest_component is None
                              else args.keep_largest_component)
    if task in CLASSIFICATION_TASKS:
        rows = predict_radiographs(checkpoints, args.checkpoint, input_path, output, device=device,
                                   amp_dtype=amp_dtype)
    else:
        rows = predict_segmentations(checkpoints, args.checkpoint, input_path, output, task=task, tta=args.tta,
                                     keep_largest_component=keep_largest_component, device=device,
                                     amp_dtype=amp_dtype, labels_dir=Path(args.labels) if args.labels else None,
                                     tolerance_mm=args.nsd_tolerance_mm, window_batch_size=args.window_batch_size)
    tqdm.write(f"{task}: {len(rows)} prediction(s) written to {output}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

"""Left atrium segmentation with a 2D U-Net on cardiac MRI slices (MSD Task02_Heart layout).

    python train_atrium.py                                    # synthetic cardiac MRI phantom, CPU-sized
    python train_atrium.py --data-dir /data/Task02_Heart --amp
    python train_atrium.py --resume runs/atrium/last.pt       # continue an interrupted run
    python train_atrium.py --config runs/atrium/config.json --out runs/again --seed 1   # rerun a config

The network sees one slice at a time; it is judged on the stacked volume (3D Dice per case). MRI has
no absolute intensity scale, so each volume is z-scored on its own. The recipe, shared with
the other 2D script and read top to bottom in `engine/recipe2d.py` (`train_slice_segmentation`): config
-> data (preprocess once, cache; slices) -> model -> loss -> optimizer -> resume -> compile -> epoch
loop (train, validate, checkpoint) -> final validation -> metrics.json.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from data.augment2d import Augment2DConfig
from data.splits import PATIENT_PATTERN
from data.synthetic.heart import ensure_heart_phantom
from engine.config import check_sizes, parse_config
from engine.recipe2d import train_slice_segmentation


@dataclass
class Config:
    # data
    data_dir: str | None = None  # MSD task folder (dataset.json, imagesTr/, labelsTr/); none = the synthetic cardiac MRI phantom
    out: str = "runs/atrium"  # run folder: config.json, last.pt, best.pt, metrics.json, dice_per_case.csv, log.jsonl, TensorBoard, predictions/
    cache_dir: str = ".cache"  # preprocessed arrays (and the generated phantom) live here, keyed by their parameters
    spacing: tuple[float, ...] | None = None  # target voxel spacing z,y,x in mm; auto = the training set's median spacing
    val_fraction: float = 0.2  # share of patients held out for validation (ignored when --fold is set)
    fold: int | None = None  # 5-fold cross-validation: validate on fold 0..4 instead of a val_fraction split
    split_seed: int = 12345  # seed of the case split, fixed so that runs with other --seed values compare on the same cases
    patient_pattern: str = PATIENT_PATTERN  # regex whose group 1 is a case's patient (ACDC: acdc_<patient>_f<frame>); a patient's cases stay on one side; '' = every case its own patient
    splits_file: str | None = None  # nnU-Net's splits_final.json: its --fold is the split, winning over val_fraction and patient_pattern
    synthetic_cases: int = 16  # phantom only: number of generated MRI volumes
    synthetic_matrix: int = 96  # phantom only: in-plane voxels per slice (the size knob; tests use ~24)
    # slices, sampling and augmentation
    slice_axis: int = 0  # axis of the (z, y, x) volume the slices are cut along: 0 = the acquired (axial) slices
    image_size: tuple[int, ...] = (256, 256)  # network input H,W in pixels (one int = square)
    fit: str = "resize"  # resize (the whole slice, aspect kept) or crop (a full-resolution window; sliding-window validation)
    foreground_share: float | None = None  # share of training slices showing the atrium; none = every slice equally likely
    samples_per_epoch: int = 4000  # slices drawn per epoch (with replacement)
    augment: Augment2DConfig = field(default_factory=Augment2DConfig)  # spatial and intensity augmentation (edit via --config); no flips: the atrium has a side
    # model
    base_channels: int = 32  # feature channels at full resolution, doubled each level up to max_channels
    depth: int = 6  # resolution levels of the U-Net (5 poolings: 256 -> 8 pixels at the bottleneck)
    max_channels: int = 512  # cap on feature channels (nnU-Net's 512 for 2D)
    norm: str = "instance"  # instance (nnU-Net; computed by nn.InstanceNorm2d on CUDA, nn.GroupNorm elsewhere: the faster there), instance_norm or group_norm (force one), or batch
    memory_format: str = "auto"  # layout of activations: auto (contiguous on CUDA and MPS, channels_last on the CPU), channels_last or contiguous
    upsample: str = "transpose"  # transpose (nnU-Net) or interpolate (bilinear + conv)
    loss: str = "dice"  # dice (batch soft Dice), bce or bce_dice
    # optimisation
    optimizer: str = "adamw"  # adamw or sgd (Nesterov, nnU-Net)
    lr: float = 1e-3  # initial learning rate (~1e-3 suits AdamW; nnU-Net: 0.01 with SGD)
    momentum: float = 0.99  # SGD Nesterov momentum (nnU-Net)
    weight_decay: float = 1e-4  # decoupled weight decay (AdamW) or L2 penalty (SGD)
    schedule: str = "cosine"  # cosine (with linear warm-up) or poly (nnU-Net: lr*(1-t)^0.9)
    warmup_steps: int = 100  # cosine only: iterations of linear warm-up
    grad_clip: float = 12.0  # max gradient norm (nnU-Net); 0 disables
    batch_size: int = 16  # slices per step (per process)
    epochs: int = 100  # total epochs (a resumed run continues up to this number)
    # validation
    val_every: int = 10  # validate every N epochs; always after the last epoch
    largest_component: bool = True  # keep only the largest connected 3D component: there is one left atrium
    nsd_tolerance_mm: float = 2.0  # normalised surface Dice counts boundary voxels within this distance as correct
    # hardware and reproducibility
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu
    amp: bool = False  # mixed precision: fp16 autocast + GradScaler on CUDA, bf16 on CPU
    amp_dtype: str = "auto"  # auto, fp16 or bf16
    compile: bool = False  # torch.compile the model (slow start, faster steps on GPU)
    benchmark: int = 0  # N > 0: time N training steps (steps/s, samples/s, data wait, first step, peak memory) and stop; no validation or checkpoints
    workers: int | None = None  # DataLoader processes preparing slices, per training process (0 = in it); none = its share of the cores available, less one
    seed: int = 0  # seeds weights, sampling and augmentation; same seed and workers -> same numbers
    deterministic: bool = False  # force deterministic kernels on CUDA (slower; CPU runs are deterministic anyway)


# Without --data-dir the recipe trains on the phantom in ~6 minutes on 2 CPU cores: small slices,
# a small network, few epochs.
SYNTHETIC_PROFILE = dict(
    image_size=(96, 96), base_channels=12, depth=4, samples_per_epoch=480, epochs=16, val_every=4,
    batch_size=16, lr=3e-3, warmup_steps=30, workers=1)


def main(argv: list[str]) -> dict:
    config, resume = parse_config(Config, argv, __doc__, SYNTHETIC_PROFILE)
    check_sizes("--image-size", config.image_size, axes="H,W")

    def make_phantom(root: Path) -> Path:
        return ensure_heart_phantom(root, num_cases=config.synthetic_cases, matrix=config.synthetic_matrix)

    return train_slice_segmentation(config, resume, make_phantom, task="atrium")


if __name__ == "__main__":
    main(sys.argv[1:])

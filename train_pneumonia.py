"""Pneumonia classification from chest radiographs (RSNA Pneumonia Detection Challenge layout) with a
ResNet18, class activation maps on the validation images.

    python train_pneumonia.py                                   # synthetic chest X-ray phantom, CPU-sized
    python train_pneumonia.py --data-dir /data/rsna --amp       # RSNA download, ImageNet weights
    python train_pneumonia.py --data-dir /data/rsna --weights /models/resnet18-f37072fd.pth  # offline
    python train_pneumonia.py --resume runs/pneumonia/last.pt   # continue an interrupted run
    python train_pneumonia.py --config runs/pneumonia/config.json --out runs/again   # rerun a config

The recipe, top to bottom: config -> data (decode DICOM once into a uint8 cache, split by patient) ->
model -> loss -> optimizer -> resume -> compile -> epoch loop (train, validate, checkpoint) -> final
validation -> class activation maps -> metrics.json. Checkpoints carry the image size, the
normalisation and the chosen threshold, so inference needs nothing else.
"""

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from data.augment2d import Augment2DConfig
from data.rsna import ChestXrayDataset, cache_images, image_statistics, read_rsna_dataset, scale_boxes, \
    split_patients
from data.samplers import WeightedClassSampler
from data.synthetic.rsna import ensure_rsna_phantom
from engine.cam import box_area_fraction, cam_mass_in_boxes, cam_peak_in_boxes, class_activation_maps, grad_cams, \
    save_cam_overlay
from engine.checkpoint import resume_training, save_checkpoint, training_state
from engine.classification import classification_metrics, predict_probabilities
from engine.config import check_sizes, parse_config as parse_config_with_profile
from engine.distributed import cleanup_distributed, main_process_first, rank_and_world_size
from engine.logging import RunLogger
from engine.loader import build_loader
from engine.optim import build_optimizer
from engine.runtime import start_run
from engine.throughput import benchmark_training
from engine.train import train_one_epoch
from losses import BCELoss
from models.resnet import ResNet18Classifier, load_weights


def chest_xray_augmentation() -> Augment2DConfig:
    # No elastic deformation (it bends ribs and lung borders into shapes no radiograph shows) and
    # milder rotation than the 2D default: films are taken upright, rarely tilted more than ~10 degrees.
    return Augment2DConfig(rotation_range_deg=10.0, p_elastic=0.0, scale_range=(0.9, 1.1),
                           translate_fraction=0.06)


@dataclass
class Config:
    # data
    data_dir: str | None = None  # RSNA folder (stage_2_train_labels.csv, stage_2_train_images/); none = the synthetic phantom
    out: str = "runs/pneumonia"  # run folder: config.json, last.pt, best.pt, metrics.json, log.jsonl, cam/, TensorBoard events
    cache_dir: str = ".cache"  # decoded, resized images (and the generated phantom) live here, keyed by their parameters
    image_size: tuple[int, ...] = (224, 224)  # network input H,W in pixels (one int = square); films are resized to it once, when the cache is built
    val_fraction: float = 0.2  # share of patients held out for validation, stratified by class
    split_seed: int = 12345  # seed of the patient split, fixed so that runs with other --seed values compare on the same patients
    synthetic_patients: int = 1000  # phantom only: number of generated radiographs (a share of 0.22 with pneumonia, as RSNA)
    synthetic_matrix: int = 256  # phantom only: pixels per side of the generated films (the size knob; tests use ~64)
    # sampling and augmentation
    balance: str = "sampler"  # sampler (draw positives at --positive-share), pos_weight (weigh positives by negatives/positives in BCE) or none
    positive_share: float = 0.5  # sampler only: expected share of pneumonia films among the draws, a class balance (not the segmentation recipes' foreground_share: every film shows lungs, none is centred anywhere; RSNA itself has 0.22)
    samples_per_epoch: int | None = None  # images drawn per epoch; none = as many as training patients
    augment: Augment2DConfig = field(default_factory=chest_xray_augmentation)  # rotation, scaling, shift, intensity (edit via --config)
    crop_min_area: float = 0.8  # random resized crop: smallest share of the film a crop keeps (1 disables)
    hflip: bool = False  # allow left-right flips (off: the heart lies on the patient's left, a flipped film is anatomically wrong)
    # model
    weights: str = "imagenet"  # imagenet (torchvision IMAGENET1K_V1), none (from scratch) or PATH of a ResNet18 state_dict
    output_stride: int = 32  # 32 (ResNet18 as published) or 16 (last stage dilated: CAMs at twice the resolution, ~1.7x compute)
    freeze_backbone: bool = False  # train the linear head only (transfer learning with little data)
    backbone_lr_factor: float = 0.1  # the pretrained backbone learns at lr * this, the new head at lr (discriminative LR)
    # optimisation
    lr: float = 3e-4  # AdamW learning rate of the head (peak of the cosine schedule)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup_steps: int = 100  # iterations of linear warm-up before the cosine decay
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    batch_size: int = 32  # images per step (per process)
    epochs: int = 10  # total epochs (a resumed run continues up to this number)
    # validation and class activation maps
    val_every: int = 1  # validate every N epochs; always after the last epoch
    cam: str = "cam"  # cam (exact for ResNet's pooled linear head) or gradcam
    cam_images: int = 16  # validation images drawn as CAM overlays into RUN/cam/ (positives first)
    # hardware and reproducibility
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu
    amp: bool = False  # mixed precision: fp16 autocast + GradScaler on CUDA, bf16 on CPU
    amp_dtype: str = "auto"  # auto, fp16 or bf16
    compile: bool = False  # torch.compile the model (slow start, faster steps on GPU)
    benchmark: int = 0  # N > 0: time N training steps (steps/s, samples/s, data wait, first step, peak memory) and stop; no validation or checkpoints
    workers: int | None = None  # DataLoader processes augmenting images, per training process (0 = in it), and DICOM decoders of the first run; none = its share of the cores available, less one
    seed: int = 0  # seeds weights, sampling and augmentation; same seed and workers -> same numbers
    deterministic: bool = False  # force deterministic kernels on CUDA (slower; CPU runs are deterministic anyway)


# Without --data-dir the recipe trains on the phantom in ~13 minutes on 2 CPU cores: a from-scratch
# network (no download) with a higher learning rate, batches of 16 (twice the updates an epoch gives
# at 32) and few epochs. Films are 192 px rather than a cheaper 128: at 128 px a cell of the last
# feature map sees the whole film, and the network spread its evidence over many cells, so half as
# much of the CAMs' heat fell on the opacities (see the README's measured figures).
SYNTHETIC_PROFILE = dict(
    image_size=(192, 192), batch_size=16, weights="none", backbone_lr_factor=1.0, lr=1e-3, warmup_steps=25, epochs=7,
    workers=1)


def parse_config(argv: list[str]) -> tuple[Config, str | None]:
    config, resume = parse_config_with_profile(Config, argv, __doc__, SYNTHETIC_PROFILE)
    check_sizes("--image-size", config.image_size, axes="H,W")
    if config.balance not in ("sampler", "pos_weight", "none"):
        raise SystemExit(f"--balance {config.balance}: choose sampler, pos_weight or none")
    if config.cam not in ("cam", "gradcam"):
        raise SystemExit(f"--cam {config.cam}: choose cam or gradcam")
    return config, resume


def prepare_data(config: Config, logger: RunLogger, *, workers: int):
    """Read the labels (or generate the phantom), decode every image once into the cache (``workers``
    processes), split by patient."""
    cache_dir = Path(config.cache_dir)
    if config.data_dir is None:
        root = ensure_rsna_phantom(cache_dir / "synthetic", num_patients=config.synthetic_patients,
                                   matrix=config.synthetic_matrix)
    else:
        root = Path(config.data_dir)
    patients = read_rsna_dataset(root)
    started = time.perf_counter()
    images, source_shapes = cache_images(root, patients, config.image_size, cache_dir, workers=workers)
    train_indices, val_indices = split_patients(patients, config.val_fraction, config.split_seed)
    labels = np.array([p.label for p in patients])
    logger.info(f"{root}: {len(patients)} patients ({labels.mean():.0%} positive), {len(train_indices)} "
                f"training / {len(val_indices)} validation, {'x'.join(map(str, config.image_size))} px cache ready in "
                f"{time.perf_counter() - started:.0f} s")
    return patients, images, source_shapes, labels, train_indices, val_indices


def parameter_groups(model: ResNet18Classifier, *, lr: float, backbone_lr_factor: float) -> list[dict]:
    """Discriminative learning rates: pretrained features need small steps, the new head large ones."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    backbone = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("backbone.fc.")]
    groups = [{"params": head, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_factor})
    return groups


def validate(model, loader, *, device: torch.device, amp_dtype: torch.dtype | None, logger: RunLogger,
             epoch: int) -> dict:
    """Probabilities on the validation split and the metrics from them (Youden threshold chosen here)."""
    probabilities, labels, indices = predict_probabilities(model, loader, device=device, amp_dtype=amp_dtype)
    metrics = classification_metrics(probabilities, labels)
    logger.scalars(metrics, epoch, prefix="val/")
    logger.info(f"validation: AUC {metrics['auc']:.4f}, accuracy {metrics['accuracy']:.3f} at 0.5, "
                f"sensitivity {metrics['sensitivity_youden']:.3f} / specificity "
                f"{metrics['specificity_youden']:.3f} at {metrics['threshold_youden']:.3f} (Youden)")
    return {"metrics": metrics, "probabilities": probabilities, "indices": indices}


def score_activation_maps(model, dataset: ChestXrayDataset, validation: dict, *, patients, images,
                          source_shapes, config: Config, device: torch.device) -> tuple[dict, list[dict]]:
    """CAM for every positive validation image: the mean share of its mass inside the boxes
    (``cam_in_box``) beside the boxes' area share (what a uniform map scores), the share of images
    whose CAM peaks inside a box (``cam_peak_in_box``, the pointing game), and the same three over the
    positives the model detects at the Youden threshold (``_detected``, when any is: a missed opacity
    has no evidence to localise).

    Returns:
        the scores, and the overlays of ``cam_images`` validation images, positives first, to draw
        with ``save_cam_overlay``: {"film", "image", "cam", "boxes", "caption"} each.
    """
    model.eval()
    compute = class_activation_maps if config.cam == "cam" else grad_cams
    indices, probabilities = validation["indices"], validation["probabilities"]  # in dataset order
    positives = [k for k, i in enumerate(indices) if patients[i].label == 1]
    negatives = [k for k, i in enumerate(indices) if patients[i].label == 0]
    drawn = set((positives + negatives)[:config.cam_images])
    threshold = validation["metrics"]["threshold_youden"]
    in_box, peak_in_box, area, detected, overlays = [], [], [], [], []
    for start in range(0, len(indices), config.batch_size):
        chunk = [k for k in range(start, min(start + config.batch_size, len(indices)))
                 if k in drawn or patients[indices[k]].label == 1]
        if not chunk:
            continue
        batch = torch.stack([dataset[k]["image"] for k in chunk]).to(device)
        cams = compute(model, batch).cpu().numpy()  # (B, H, W)
        for k, cam in zip(chunk, cams):
            patient = patients[indices[k]]
            boxes = scale_boxes(patient.boxes, tuple(source_shapes[indices[k]]), config.image_size)
            if patient.label == 1:
                in_box.append(cam_mass_in_boxes(cam, boxes))
                peak_in_box.append(cam_peak_in_boxes(cam, boxes))
                area.append(box_area_fraction(boxes, cam.shape))
                detected.append(probabilities[k] >= threshold)
            if k in drawn:
                overlays.append({"film": patient.patient_id, "image": images[indices[k]], "cam": cam, "boxes": boxes,
                                 "caption": f"label {patient.label}  p {probabilities[k]:.2f}"})
    if not in_box:
        return {}, overlays
    scores = {"cam_in_box": in_box, "cam_peak_in_box": peak_in_box, "box_area_fraction": area}
    result = {key: float(np.mean(values)) for key, values in scores.items()}
    detected = np.array(detected)
    if detected.any():  # the Youden threshold calls at least one positive unless every film is positive
        result.update({f"{key}_detected": float(np.mean(np.array(values)[detected])) for key, values in scores.items()})
    return result, overlays


def draw_activation_maps(overlays: list[dict], out: Path, logger: RunLogger) -> None:
    """PNG overlays under ``out/cam/``; one that cannot be drawn is skipped with a warning, since the
    pictures only illustrate results that are already written."""
    for overlay in overlays:
        try:
            save_cam_overlay(out / "cam" / f"{overlay['film']}.png", overlay["image"], overlay["cam"],
                             overlay["boxes"], caption=overlay["caption"])
        except (ValueError, OSError) as error:
            logger.info(f"warning: no CAM overlay for film {overlay['film']} ({error}); skipped")


def main(argv: list[str]) -> dict:
    config, resume = parse_config(argv)
    out, device, amp_dtype, workers, logger = start_run(config, resume)
    rank, world_size = rank_and_world_size()  # (0, 1) unless launched by torchrun

    # Data: one uint8 cache of every film; normalisation from the training split, kept in checkpoints.
    with main_process_first():  # under torchrun rank 0 fills the cache, the others then read it
        patients, images, source_shapes, labels, train_indices, val_indices = prepare_data(config, logger,
                                                                                           workers=workers)
    mean, std = image_statistics(images, train_indices)
    augment = config.augment
    if config.hflip:
        augment = dataclasses.replace(augment, flip_axes=(1,))
    train_data = ChestXrayDataset(images, labels, train_indices, mean=mean, std=std, augment=augment,
                                  crop_min_area=config.crop_min_area, seed=config.seed)
    val_data = ChestXrayDataset(images, labels, val_indices, mean=mean, std=std)
    samples_per_epoch = config.samples_per_epoch or len(train_indices)
    shares = {1: config.positive_share, 0: 1 - config.positive_share} if config.balance == "sampler" else None
    train_sampler = WeightedClassSampler(labels[train_indices], num_samples=samples_per_epoch, class_shares=shares,
                                         seed=config.seed, num_replicas=world_size, rank=rank)
    # drop_last: a last batch of one or two images would give batch norm useless statistics.
    loader = build_loader(train_data, train_sampler, batch_size=config.batch_size, workers=workers, device=device,
                          drop_last=True)
    # Validation runs once in a while: its workers are not kept between uses.
    val_loader = build_loader(val_data, None, batch_size=config.batch_size, workers=workers, device=device,
                              persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"{samples_per_epoch} samples per epoch make no batch of {config.batch_size}; "
                         "lower --batch-size or raise --samples-per-epoch")

    # Model, loss, optimizer.
    model = ResNet18Classifier(in_channels=1, num_classes=1, output_stride=config.output_stride)
    if resume is None:
        load_weights(model, config.weights)
    if config.freeze_backbone:
        model.freeze_backbone()
    model = model.to(device, memory_format=torch.channels_last)
    positives = int(labels[train_indices].sum())
    pos_weight = (len(train_indices) - positives) / max(positives, 1) if config.balance == "pos_weight" else None
    loss_fn = BCELoss(pos_weight=pos_weight)
    # AdamW with a smaller learning rate for the backbone, linear warm-up then cosine, stepped every batch.
    groups = parameter_groups(model, lr=config.lr, backbone_lr_factor=config.backbone_lr_factor)
    optimizer, scheduler = build_optimizer(groups, "adamw", lr=config.lr, weight_decay=config.weight_decay,
                                           schedule="cosine", total_steps=config.epochs * steps_per_epoch,
                                           warmup_steps=config.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best_auc = 0, -1.0
    if resume:  # every state that shapes the following steps: weights, optimizer, schedule, scaler, RNGs
        start_epoch, best_auc = resume_training(resume, model, optimizer, scheduler, scaler)
        logger.info(f"resumed from {resume} at epoch {start_epoch + 1}")

    train_model = model  # wrapped below; the plain model is what we save (its state_dict loads anywhere)
    if world_size > 1:  # torchrun: gradients averaged at every step (batch norm statistics stay per process)
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # Compile what trains, and only that: validation runs the plain `model` (the same weights, outside
    # DDP), where a compiled one would trace new graphs for no-grad, eval mode and the last small batch.
    if config.compile:
        train_model = torch.compile(train_model)
    if config.benchmark:  # throughput only: no validation, no checkpoints
        return benchmark_training(train_model, loader, train_sampler, loss_fn, optimizer, steps=config.benchmark,
                                  scheduler=scheduler, scaler=scaler, device=device, amp_dtype=amp_dtype,
                                  grad_clip=config.grad_clip, memory_format=torch.channels_last, out=out,
                                  logger=logger)

    def checkpoint_state(epoch: int, threshold: float) -> dict:
        return training_state(model, optimizer, scheduler, scaler, epoch=epoch, best_metric=best_auc,
                              config=dataclasses.asdict(config), image_size=config.image_size,
                              normalization={"mean": mean, "std": std}, threshold=threshold, task="pneumonia")

    # Epoch loop: train, validate every val_every epochs and after the last, checkpoint every epoch.
    validation, threshold = None, 0.5
    for epoch in range(start_epoch, config.epochs):
        train_sampler.set_epoch(epoch)
        started = time.perf_counter()
        stats = train_one_epoch(train_model, loader, loss_fn, optimizer, scheduler=scheduler, scaler=scaler,
                                device=device, amp_dtype=amp_dtype, grad_clip=config.grad_clip,
                                memory_format=torch.channels_last, description=f"epoch {epoch + 1}/{config.epochs}", progress=rank == 0)
        logger.scalars(stats, epoch, prefix="train/")
        logger.info(f"epoch {epoch + 1}/{config.epochs}: loss {stats['loss']:.4f}, lr {stats['lr']:.2e}, "
                    f"{stats['samples_per_s']:.1f} images/s, data wait {100 * stats['data_wait_fraction']:.0f}%")
        record = {"epoch": epoch, **stats, "epoch_time_s": time.perf_counter() - started}
        if rank == 0 and ((epoch + 1) % config.val_every == 0 or epoch == config.epochs - 1):
            validation = validate(model, val_loader, device=device, amp_dtype=amp_dtype, logger=logger,
                                  epoch=epoch)
            threshold = validation["metrics"]["threshold_youden"]
            record.update(validation["metrics"])
            if validation["metrics"]["auc"] > best_auc:
                best_auc = validation["metrics"]["auc"]
                save_checkpoint(checkpoint_state(epoch, threshold), out / "best.pt")
        if rank == 0:
            save_checkpoint(checkpoint_state(epoch, threshold), out / "last.pt")
        logger.record(record)

    # The results, by rank 0 while the other processes wait at cleanup_distributed's barrier.
    metrics = {}
    if rank == 0:
        if validation is None:  # resumed after the last epoch: nothing left to train, validate once
            validation = validate(model, val_loader, device=device, amp_dtype=amp_dtype, logger=logger,
                                  epoch=config.epochs - 1)
        metrics = dict(validation["metrics"])
        cam_scores, overlays = score_activation_maps(model, val_data, validation, patients=patients, images=images,
                                                     source_shapes=source_shapes, config=config, device=device)
        metrics.update(cam_scores)
        # The results first: the pictures below are optional, and none of them may cost the run its metrics.
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        for suffix, films in (("", "positive films"), ("_detected", "detected positives")):
            if "cam_in_box" + suffix in metrics:  # no detected positive: no "_detected" scores
                logger.info(f"{films}: CAM mass inside the boxes {metrics['cam_in_box' + suffix]:.3f}, CAM peak "
                            f"inside a box for {metrics['cam_peak_in_box' + suffix]:.3f} of them (boxes cover "
                            f"{metrics['box_area_fraction' + suffix]:.3f} of the image)")
        draw_activation_maps(overlays, out, logger)
        logger.close()
    cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

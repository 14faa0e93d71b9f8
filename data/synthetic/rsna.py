"""Chest radiograph phantom with pneumonia, written in the RSNA Pneumonia Detection Challenge layout.

    from data.synthetic.rsna import ensure_rsna_phantom
    root = ensure_rsna_phantom(".cache/synthetic", num_patients=1000, matrix=256)

The folder looks like the Kaggle download and is read by the same code::

    <root>/stage_2_train_labels.csv          patientId,x,y,width,height,Target (one row per box)
    <root>/stage_2_detailed_class_info.csv   patientId,class (repeated per box, as in the original)
    <root>/stage_2_train_images/<patientId>.dcm
    <root>/dataset.json                      generator parameters, written last (marks a complete folder)

Each image is a frontal (PA or AP) projection: body soft tissue, two lungs, ribs, spine and
mediastinum, heart towards the patient's left (the image's right), domed diaphragm, varied patient
size, position and exposure. About 22% of patients have pneumonia, drawn as 1-3 patchy opacities
inside the lungs with a box each; opacities vary in size and faintness, and some are barely visible.
A share of the negatives are "No Lung Opacity / Not Normal" (an enlarged heart or a small dense
nodule), so "abnormal" alone does not give the label away.

The files are real DICOM (CR, PixelSpacing, PatientID = patientId, ViewPosition, sex and age) written
with pydicom: most are uncompressed 8-bit MONOCHROME2, a share JPEG Baseline (as RSNA's own files), a
share MONOCHROME1 and a share 12-bit with RescaleSlope/Intercept, so every decoder path runs.
"""

import csv
import io
import json
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from scipy import ndimage

from data.synthetic.msd_layout import ensure_dataset

GENERATOR_VERSION = 2  # bump when the drawing changes, so cached phantoms are regenerated
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
POSITIVE_FRACTION = 0.22  # RSNA: 6,012 of 26,684 patients
NOT_NORMAL_FRACTION = 0.35  # share of negatives labelled "No Lung Opacity / Not Normal"
# How the file is stored, cycled by patient so even a handful of files covers every decoder path.
STORAGE = ("plain", "jpeg", "plain", "monochrome1", "plain", "rescaled12")
DETECTOR_MM = 350.0  # a CR cassette's width; PixelSpacing = DETECTOR_MM / matrix


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Unit-SD random field with about ``cells`` blobs across, drawn coarse and upsampled."""
    coarse = rng.standard_normal((cells + 3, cells + 3))
    field = ndimage.zoom(coarse, (shape[0] / (cells + 3), shape[1] / (cells + 3)), order=3)
    field = field[:shape[0], :shape[1]]
    return (field - field.mean()) / max(field.std(), 1e-6)


def _draw_chest(rng: np.random.Generator, matrix: int, finding: str) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation picture of one chest and its lung mask.

    Returns:
        (H, W) float attenuation (higher = brighter on film) and (H, W) bool lungs.
    """
    y, x = np.mgrid[0:matrix, 0:matrix].astype(np.float32) / matrix * 2 - 1  # [-1, 1), y towards the feet
    size = rng.uniform(0.85, 1.1)  # patient width relative to the detector
    cx, cy = rng.uniform(-0.06, 0.06), rng.uniform(-0.05, 0.08)
    x, y = (x - cx) / size, (y - cy) / size

    body = np.clip(1 - (x / 0.92) ** 2, 0, None) ** 0.5  # soft-tissue thickness of an elliptic trunk
    attenuation = 0.9 * body
    lung_height = rng.uniform(0.55, 0.7)
    lungs = np.zeros_like(body, dtype=bool)
    for side in (-1, 1):
        lx = side * rng.uniform(0.3, 0.36)
        half_width = rng.uniform(0.25, 0.3)
        top, dome = -0.75 + rng.uniform(-0.05, 0.05), rng.uniform(0.05, 0.12)
        # The diaphragm dome: the lung's lower border is highest under its middle.
        bottom = top + 2 * lung_height - dome * (1 - ((x - lx) / half_width) ** 2)
        shape = ((x - lx) / half_width) ** 2 + ((y - (top + bottom) / 2) / ((bottom - top) / 2)) ** 2
        lungs |= (shape < 1) & (y < bottom)
    lung_density = ndimage.gaussian_filter(lungs.astype(np.float32), matrix / 120)
    attenuation -= rng.uniform(0.55, 0.7) * lung_density

    # Ribs: arcs falling towards the sides, seen through the lungs.
    for side in (-1, 1):
        for k in range(9):
            centre = -0.78 + k * rng.uniform(0.15, 0.17)
            arc = centre + 0.35 * (x * side - 0.05) ** 2 - 0.1 * (x * side)
            rib = np.exp(-((y - arc) / 0.022) ** 2) * (x * side > 0.04) * (np.abs(x) < 0.85)
            attenuation += 0.12 * rib
    # Spine and mediastinum down the middle, heart towards the patient's left (image right).
    attenuation += 0.25 * np.exp(-(x / 0.09) ** 4) + 0.35 * np.exp(-(x / 0.16) ** 4) * (y > -0.75)
    heart_scale = rng.uniform(1.25, 1.45) if finding == "cardiomegaly" else rng.uniform(0.95, 1.1)
    hx, hy = 0.12, 0.32 + rng.uniform(-0.05, 0.05)
    heart = ((x - hx) / (0.27 * heart_scale)) ** 2 + ((y - hy) / (0.2 * heart_scale)) ** 2 < 1
    attenuation += 0.3 * ndimage.gaussian_filter(heart.astype(np.float32), matrix / 100)
    lungs &= ~heart
    if finding == "nodule":
        ys, xs = np.nonzero(lungs)
        i = rng.integers(len(ys))
        radius = rng.uniform(0.025, 0.045) * matrix
        yy, xx = np.mgrid[0:matrix, 0:matrix]
        attenuation += 0.35 * (((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) < radius ** 2)
    attenuation += 0.05 * _smooth_noise(rng, (matrix, matrix), 12) * body
    return attenuation, lungs


def _draw_opacities(rng: np.random.Generator, attenuation: np.ndarray, lungs: np.ndarray
                    ) -> list[tuple[float, float, float, float]]:
    """Add 1-3 pneumonia opacities inside the lungs, in place; returns their (x, y, width, height)."""
    matrix = attenuation.shape[0]
    yy, xx = np.mgrid[0:matrix, 0:matrix].astype(np.float32)
    ys, xs = np.nonzero(ndimage.binary_erosion(lungs, iterations=max(1, matrix // 40)))
    boxes = []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        i = rng.integers(len(ys))
        radius_y, radius_x = rng.uniform(0.06, 0.14, size=2) * matrix
        blob = np.exp(-(((yy - ys[i]) / radius_y) ** 2 + ((xx - xs[i]) / radius_x) ** 2) ** 1.5)
        # Patchy airspace disease: a blotchy texture, kept inside the lung it arose in.
        texture = np.clip(1 + 0.6 * _smooth_noise(rng, (matrix, matrix), 16), 0.2, None)
        inside = ndimage.gaussian_filter((lungs & (blob > 0.05)).astype(np.float32), matrix / 150)
        # Most opacities are plain to a radiologist; one in six is barely visible under ribs and noise.
        faintness = rng.uniform(0.05, 0.12) if rng.random() < 1 / 6 else rng.uniform(0.15, 0.4)
        attenuation += faintness * blob * texture * inside
        rows, cols = np.nonzero((blob > 0.3) & lungs)
        if len(rows) == 0:
            continue
        x0, y0 = cols.min(), rows.min()
        boxes.append((float(x0), float(y0), float(cols.max() - x0 + 1), float(rows.max() - y0 + 1)))
    return boxes


def _expose(rng: np.random.Generator, attenuation: np.ndarray) -> np.ndarray:
    """Film response: exposure, contrast and quantum noise vary per image. Returns values in [0, 1]."""
    gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
    gamma = rng.uniform(0.8, 1.25)
    image = np.clip(gain * attenuation + offset, 0, None) ** gamma
    image += rng.uniform(0.01, 0.04) * rng.standard_normal(image.shape)
    image = ndimage.gaussian_filter(image, 0.6)
    return np.clip(image / np.percentile(image, 99.8), 0, 1)


def write_dicom(path: Path, image: np.ndarray, *, patient_id: str, storage: str, view: str, sex: str,
                age: int, pixel_spacing_mm: float) -> None:
    """Write ``image`` ((H, W) in [0, 1], bright = dense) as a CR DICOM file.

    Args:
        storage: ``plain`` (8-bit MONOCHROME2), ``jpeg`` (JPEG Baseline, encoded with Pillow and
            encapsulated, as RSNA's files), ``monochrome1`` (8-bit, inverted grey scale) or
            ``rescaled12`` (12 bits stored in 16 with RescaleSlope/Intercept).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient_id, "instance"])
    meta.TransferSyntaxUID = JPEGBaseline8Bit if storage == "jpeg" else ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = CR_IMAGE_STORAGE
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    dataset.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, "series"])
    dataset.Modality = "CR"
    dataset.PatientID = dataset.PatientName = patient_id
    dataset.PatientSex, dataset.PatientAge = sex, f"{age:03d}Y"
    dataset.BodyPartExamined, dataset.ViewPosition = "CHEST", view
    dataset.Rows, dataset.Columns = image.shape
    dataset.PixelSpacing = [f"{pixel_spacing_mm:.4f}", f"{pixel_spacing_mm:.4f}"]
    dataset.SamplesPerPixel = 1
    dataset.PixelRepresentation = 0
    dataset.PhotometricInterpretation = "MONOCHROME1" if storage == "monochrome1" else "MONOCHROME2"

    if storage == "rescaled12":
        # Stored = (value - intercept) / slope: the reader must apply the modality transform.
        slope, intercept = 0.5, -100.0
        stored = np.round((image * 2000 - intercept) / slope).clip(0, 4095).astype(np.uint16)
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        dataset.RescaleSlope, dataset.RescaleIntercept = f"{slope}", f"{intercept}"
        dataset.PixelData = stored.tobytes()
    else:
        stored = np.round(image * 255).astype(np.uint8)
        if storage == "monochrome1":
            stored = 255 - stored
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
        if storage == "jpeg":
            buffer = io.BytesIO()
            Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
            dataset.PixelData = encapsulate([buffer.getvalue()])
            dataset["PixelData"].VR = "OB"
            dataset.LossyImageCompression = "01"
        else:
            dataset.PixelData = stored.tobytes()
    dataset.save_as(path, enforce_file_format=True)


def write_rsna_phantom(root: Path, num_patients: int, matrix: int, seed: int) -> Path:
    """Write ``num_patients`` chest radiographs and their label files in the RSNA layout at ``root``."""
    root = Path(root)
    (root / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    label_rows, class_rows = [], []
    for index in range(num_patients):
        patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))  # RSNA's ids are UUIDs too
        positive = rng.random() < POSITIVE_FRACTION
        not_normal = not positive and rng.random() < NOT_NORMAL_FRACTION
        finding = rng.choice(["cardiomegaly", "nodule"]) if not_normal else "none"
        attenuation, lungs = _draw_chest(rng, matrix, finding)
        boxes = _draw_opacities(rng, attenuation, lungs) if positive else []
        positive = bool(boxes)
        image = _expose(rng, attenuation)
        write_dicom(root / "stage_2_train_images" / f"{patient_id}.dcm", image, patient_id=patient_id,
                    storage=STORAGE[index % len(STORAGE)], view=str(rng.choice(["PA", "AP"])),
                    sex=str(rng.choice(["M", "F"])), age=int(rng.integers(18, 90)),
                    pixel_spacing_mm=DETECTOR_MM / matrix)
        if positive:
            for box in boxes:
                label_rows.append([patient_id, *(f"{v:.1f}" for v in box), 1])
                class_rows.append([patient_id, "Lung Opacity"])
        else:
            label_rows.append([patient_id, "", "", "", "", 0])
            class_rows.append([patient_id, "No Lung Opacity / Not Normal" if not_normal else "Normal"])
    with open(root / "stage_2_train_labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(label_rows)
    with open(root / "stage_2_detailed_class_info.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["patientId", "class"])
        writer.writerows(class_rows)
    (root / "dataset.json").write_text(json.dumps(
        {"name": "RSNA pneumonia phantom", "generator_version": GENERATOR_VERSION,
         "num_patients": num_patients, "matrix": matrix, "seed": seed}, indent=2) + "\n")
    return root


def ensure_rsna_phantom(cache_root: str | Path, num_patients: int = 1000, matrix: int = 256,
                        seed: int = 0) -> Path:
    """Return a cached phantom folder under ``cache_root``, generating it on first use."""
    return ensure_dataset(cache_root, f"RSNAPhantom_v{GENERATOR_VERSION}", write_rsna_phantom,
                          num_patients=num_patients, matrix=matrix, seed=seed)

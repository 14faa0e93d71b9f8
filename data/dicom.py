"""Read one 2D DICOM image (a radiograph) into float32 pixels where brighter means more attenuation.

Decoding follows the standard's pixel pipeline in order: stored values (masked to BitsStored), the
modality transform (RescaleSlope/Intercept or a Modality LUT), then MONOCHROME1 is inverted so every
image reads the same way round. Compressed transfer syntaxes decode through whatever pydicom handlers
are installed (Pillow covers JPEG Baseline, the RSNA files' syntax, and JPEG 2000); when none fits, the
error names the file, the syntax and what to install.
"""

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut


def read_dicom_image(path: str | Path) -> np.ndarray:
    """Pixels of a single-frame greyscale DICOM image.

    Returns:
        (H, W) float32 in modality units (after rescale), larger = brighter on a MONOCHROME2 display.
    Raises:
        ValueError: the file has no pixel data, more than one frame or colour samples, or its
            transfer syntax has no installed decoder (the message names the file).
    """
    path = Path(path)
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:  # pydicom raises several types for truncated or non-DICOM files
        raise ValueError(f"{path}: not a readable DICOM file ({type(error).__name__}: {error})") from None
    if "PixelData" not in dataset:
        raise ValueError(f"{path}: the DICOM file holds no pixel data (PixelData is missing)")
    if int(dataset.get("NumberOfFrames", 1) or 1) != 1 or int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{path}: expected one greyscale frame, found NumberOfFrames "
                         f"{dataset.get('NumberOfFrames', 1)}, SamplesPerPixel {dataset.get('SamplesPerPixel')}")
    syntax = dataset.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)
    try:
        stored = dataset.pixel_array
    except Exception as error:  # NotImplementedError, RuntimeError or ValueError, depending on the handler
        raise ValueError(
            f"{path}: cannot decode transfer syntax {syntax.name} ({syntax}): {error}. Install a decoder "
            "for it (Pillow handles JPEG Baseline and JPEG 2000; pylibjpeg or python-gdcm handle JPEG "
            "Lossless and JPEG-LS) or convert the file to an uncompressed syntax.") from None

    stored = _mask_to_bits_stored(stored, dataset)
    values = apply_modality_lut(stored, dataset).astype(np.float32)
    if dataset.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        # MONOCHROME1 shows the lowest value as white; flip about the representable range (not the
        # image's own range) so the same tissue keeps the same value whatever the image holds.
        low, high = _modality_range(dataset)
        values = (low + high) - values
    return values


def _mask_to_bits_stored(stored: np.ndarray, dataset) -> np.ndarray:
    """Clear bits above BitsStored: some writers leave overlay or junk bits in 16-bit words.
    Signed values are already sign-extended from BitsStored by pydicom."""
    bits_stored = int(dataset.get("BitsStored", stored.dtype.itemsize * 8))
    if stored.dtype.kind == "u" and bits_stored < stored.dtype.itemsize * 8:
        stored = stored & np.asarray((1 << bits_stored) - 1, dtype=stored.dtype)
    return stored


def _modality_range(dataset) -> tuple[float, float]:
    """Lowest and highest value the stored bits can take, after the modality transform."""
    bits_stored = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 16)))
    if int(dataset.get("PixelRepresentation", 0)) == 1:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]

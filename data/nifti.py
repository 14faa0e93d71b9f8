"""NIfTI volumes in one canonical orientation, and writing arrays back in the source geometry.

Every array in memory is oriented the same way: nibabel's closest canonical orientation (RAS+),
then the axes reversed, so images are `(C, Z, Y, X)` float32 and labels `(Z, Y, X)` uint8 with
spacing `(z, y, x)` in millimetres. The source file's affine, shape and orientation are kept so a
prediction can be written back with exactly the input file's shape and affine, which is what
ITK-SNAP and 3D Slicer need to overlay it on the original scan.
"""

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

_RAS = axcodes2ornt(("R", "A", "S"))

# What nibabel and gzip raise for a truncated, corrupt or non-NIfTI file.
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, ImageFileError)


class NiftiError(ValueError):
    """A NIfTI file that cannot be used; the message starts with the file's path."""


@dataclass(frozen=True)
class SourceGeometry:
    """What is needed to write an array back exactly in a source file's geometry.

    Args:
        affine: (4, 4) affine of the source file (nibabel's `img.affine`).
        shape: spatial shape of the source file, (i, j, k).
        orientation: (3, 2) nibabel orientation of the source axes (`io_orientation`): row i holds the
            RAS+ axis source axis i runs along and +1/-1 for its direction, i.e. the transform to canonical.
        qform: (4, 4) qform of the source header, kept because it can differ from the sform.
        qform_code: NIfTI qform code of the source header.
        sform_code: NIfTI sform code of the source header.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    orientation: np.ndarray
    qform: np.ndarray
    qform_code: int
    sform_code: int

    def to_dict(self) -> dict:
        """JSON-able plain types, for the preprocessing properties and checkpoints."""
        return {
            "affine": self.affine.tolist(),
            "shape": list(self.shape),
            "orientation": self.orientation.tolist(),
            "qform": self.qform.tolist(),
            "qform_code": self.qform_code,
            "sform_code": self.sform_code,
        }

    @classmethod
    def from_dict(cls, values: dict) -> "SourceGeometry":
        return cls(
            affine=np.asarray(values["affine"], dtype=np.float64),
            shape=tuple(int(size) for size in values["shape"]),
            orientation=np.asarray(values["orientation"], dtype=np.float64),
            qform=np.asarray(values["qform"], dtype=np.float64),
            qform_code=int(values["qform_code"]),
            sform_code=int(values["sform_code"]),
        )

    def canonical_shape(self) -> tuple[int, int, int]:
        """Spatial shape (Z, Y, X) of the canonical array read from this source."""
        ras_shape = [0, 0, 0]
        for source_axis, (ras_axis, _) in enumerate(self.orientation):
            ras_shape[int(ras_axis)] = self.shape[source_axis]
        return tuple(reversed(ras_shape))


@dataclass
class Volume:
    """A canonical array with its geometry.

    Args:
        array: image (C, Z, Y, X) float32, or label (Z, Y, X) uint8.
        spacing: voxel size (z, y, x) in millimetres.
        affine: (4, 4) affine of the canonical RAS+ array in nibabel's (x, y, z) index order,
            i.e. of `array` with its spatial axes reversed.
        source: geometry of the file it was read from.
        path: the file it was read from.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: SourceGeometry
    path: Path

    @property
    def source_affine(self) -> np.ndarray:
        return self.source.affine

    @property
    def source_shape(self) -> tuple[int, int, int]:
        return self.source.shape


def _cannot_read(path: Path, error: Exception) -> NiftiError:
    return NiftiError(f"{path}: cannot read NIfTI (file truncated or corrupt: {error}). Re-download or re-export it.")


def read_nifti_header(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file without reading its voxels (shape and affine only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NIfTI file.")
    try:
        return nib.load(path)
    except _READ_ERRORS as error:
        raise _cannot_read(path, error) from None


def _load_data(path: Path, is_label: bool) -> tuple[nib.Nifti1Image, np.ndarray]:
    image = read_nifti_header(path)
    try:
        # float32 scaling keeps a 512x512x800 CT at 0.8 GB instead of nibabel's default float64.
        data = np.asanyarray(image.dataobj) if is_label else image.get_fdata(dtype=np.float32)
    except _READ_ERRORS as error:
        raise _cannot_read(path, error) from None
    return image, data


def _spatial_and_channels(data: np.ndarray, path: Path, is_label: bool) -> np.ndarray:
    """Drop singleton axes after the third (some writers store (X, Y, Z, 1, C))."""
    if data.ndim > 3:
        data = data.reshape(data.shape[:3] + tuple(size for size in data.shape[3:] if size != 1))
    if data.ndim == 3 or (data.ndim == 4 and not is_label):
        return data
    kind = "a label map must be 3D" if is_label else "an image must be 3D or 4D (channels last)"
    raise NiftiError(f"{path}: array of shape {data.shape} cannot be used: {kind}.")


def _check_label_values(data: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(data.dtype, np.integer):
        values = data
    else:
        values = np.rint(data)
        if not np.all(np.isfinite(data)) or not np.array_equal(values, data):
            raise NiftiError(
                f"{path}: label map holds non-integer values. Save it as an integer label map "
                "(each voxel a class index), not a probability or smoothed image."
            )
    low, high = values.min(), values.max()
    if low < 0 or high > 255:
        raise NiftiError(f"{path}: label values span {low}..{high}; class indices must lie in 0..255.")
    return values.astype(np.uint8)


def read_nifti(path: str | Path, is_label: bool = False) -> Volume:
    """Read a NIfTI file into the canonical (C, Z, Y, X) / (Z, Y, X) orientation.

    Args:
        path: `.nii` or `.nii.gz` file.
        is_label: read a label map as (Z, Y, X) uint8 class indices instead of a float32 image.

    Returns:
        A `Volume`; for images `array` is (C, Z, Y, X) float32 with a 4D file's last axis as channels.
    """
    path = Path(path)
    image, data = _load_data(path, is_label)
    data = _spatial_and_channels(data, path, is_label)
    if is_label:
        data = _check_label_values(data, path)
    elif not np.all(np.isfinite(data)):
        raise NiftiError(f"{path}: image holds NaN or infinite values. Fix or re-export the scan.")

    source_orientation = io_orientation(image.affine)
    if np.isnan(source_orientation).any():
        raise NiftiError(f"{path}: affine {image.affine.tolist()} is degenerate; the file has no usable geometry.")
    orientation = ornt_transform(source_orientation, _RAS)  # equal to source_orientation, RAS+ being the identity
    spatial_shape = data.shape[:3]
    ras_data = apply_orientation(data, orientation)
    ras_affine = image.affine @ inv_ornt_aff(orientation, spatial_shape)

    # (x, y, z[, c]) -> (z, y, x) or (c, z, y, x)
    if is_label:
        array = np.ascontiguousarray(ras_data.transpose(2, 1, 0))
    else:
        channels_last = ras_data if ras_data.ndim == 4 else ras_data[..., None]
        array = np.ascontiguousarray(channels_last.transpose(3, 2, 1, 0), dtype=np.float32)
    # Column norms, not the diagonal, so the spacing is right for oblique affines.
    spacing_xyz = np.linalg.norm(ras_affine[:3, :3], axis=0)
    header = image.header
    source = SourceGeometry(
        affine=np.asarray(image.affine, dtype=np.float64),
        shape=tuple(int(size) for size in spatial_shape),
        orientation=source_orientation,
        qform=np.asarray(header.get_qform(), dtype=np.float64),
        qform_code=int(header["qform_code"]),
        sform_code=int(header["sform_code"]),
    )
    return Volume(
        array=array,
        spacing=tuple(float(size) for size in spacing_xyz[::-1]),
        affine=ras_affine,
        source=source,
        path=path,
    )


def write_nifti_like(
    array_zyx: np.ndarray,
    reference: Volume | SourceGeometry,
    path: str | Path,
    dtype: type = np.uint8,
) -> None:
    """Write a canonical array in the geometry of the file `reference` was read from.

    Args:
        array_zyx: (Z, Y, X) array, or (C, Z, Y, X) written as a 4D file with channels last,
            on the canonical grid of `reference`.
        reference: the `Volume` read from the source file, or its `SourceGeometry`.
        path: output `.nii` or `.nii.gz` file; gets exactly the source file's shape and affine.
        dtype: on-disk data type.
    """
    source = reference.source if isinstance(reference, Volume) else reference
    expected = source.canonical_shape()
    if array_zyx.shape[-3:] != expected or array_zyx.ndim not in (3, 4):
        raise ValueError(
            f"{path}: array of shape {array_zyx.shape} does not fit the canonical grid {expected} of the source."
        )
    # (z, y, x) -> (x, y, z) and (c, z, y, x) -> (x, y, z, c), then RAS+ -> source axes.
    ras_data = array_zyx.transpose(2, 1, 0) if array_zyx.ndim == 3 else array_zyx.transpose(3, 2, 1, 0)
    source_data = apply_orientation(ras_data, ornt_transform(_RAS, source.orientation))
    image = nib.Nifti1Image(np.ascontiguousarray(source_data, dtype=dtype), affine=None)
    image.set_qform(source.qform, code=source.qform_code)
    image.set_sform(source.affine, code=source.sform_code)
    image.header.set_xyzt_units("mm")
    image.header.set_data_dtype(dtype)
    nib.save(image, path)

"""DICOM decoding: every stored form of one picture reads back as that picture, brighter = denser."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from data.dicom import read_dicom_image
from data.synthetic.rsna import write_dicom


def picture(rows=37, columns=29):
    """A gradient with a bright square, in [0, 1]: smooth enough for JPEG, asymmetric so flips show."""
    image = np.add.outer(np.linspace(0, 0.6, rows), np.linspace(0, 0.2, columns))
    image[5:15, 3:12] = 0.95
    return image


def write(tmp_path, storage, image=None):
    path = tmp_path / f"{storage}.dcm"
    write_dicom(path, picture() if image is None else image, patient_id="patient-1", storage=storage, view="PA",
                sex="F", age=54, pixel_spacing_mm=0.4)
    return path


def test_plain_8bit_reads_back_exactly(tmp_path):
    pixels = read_dicom_image(write(tmp_path, "plain"))
    assert pixels.dtype == np.float32 and pixels.shape == (37, 29)
    np.testing.assert_array_equal(pixels, np.round(picture() * 255))
    dataset = pydicom.dcmread(tmp_path / "plain.dcm")
    assert dataset.Modality == "CR" and dataset.PatientID == "patient-1" and dataset.ViewPosition == "PA"


def test_jpeg_baseline_decodes_close_to_the_original(tmp_path):
    path = write(tmp_path, "jpeg")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    pixels = read_dicom_image(path)
    assert np.abs(pixels - np.round(picture() * 255)).mean() < 3  # lossy, quality 95


def test_monochrome1_is_inverted_to_the_same_orientation(tmp_path):
    path = write(tmp_path, "monochrome1")
    assert pydicom.dcmread(path).PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(read_dicom_image(path), np.round(picture() * 255))


def test_12bit_with_rescale_gives_modality_values(tmp_path):
    path = write(tmp_path, "rescaled12")
    dataset = pydicom.dcmread(path)
    assert dataset.BitsStored == 12 and float(dataset.RescaleSlope) == 0.5
    # Written as value = image * 2000, stored = (value + 100) / 0.5 and rescaled back by the reader.
    np.testing.assert_allclose(read_dicom_image(path), picture() * 2000, atol=0.26)


def test_bits_above_bits_stored_are_ignored_and_signed_16bit_rescales(tmp_path):
    path = write(tmp_path, "rescaled12")
    dataset = pydicom.dcmread(path)
    stored = dataset.pixel_array.copy()
    dataset.PixelData = (stored | np.uint16(0xF000)).tobytes()  # junk in the 4 unused high bits
    dataset.save_as(path)
    np.testing.assert_allclose(read_dicom_image(path), picture() * 2000, atol=0.26)

    signed = np.array([[-1000, 0], [500, 1200], [-3, 7]], dtype=np.int16)
    dataset.Rows, dataset.Columns = signed.shape
    dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 15, 1
    dataset.RescaleSlope, dataset.RescaleIntercept = "2", "-1024"
    dataset.PixelData = signed.tobytes()
    dataset.save_as(path)
    np.testing.assert_array_equal(read_dicom_image(path), signed * 2.0 - 1024)


def test_file_without_pixel_data_is_named(tmp_path):
    path = write(tmp_path, "plain")
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(path)
    with pytest.raises(ValueError, match=r"plain\.dcm.*no pixel data"):
        read_dicom_image(path)


def test_unsupported_transfer_syntax_names_file_and_decoder(tmp_path):
    path = write(tmp_path, "jpeg")
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless  # JPEG-LS: no decoder in the requirements
    dataset.save_as(path)
    with pytest.raises(ValueError, match=r"jpeg\.dcm: cannot decode transfer syntax JPEG-LS"):
        read_dicom_image(path)


def test_not_a_dicom_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.dcm: not a readable DICOM file"):
        read_dicom_image(path)

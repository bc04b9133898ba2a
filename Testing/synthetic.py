"""Synthetic CTs with a known "liver" for tests: geometry, formats and bad inputs made on the fly."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.geometry import image_from_array

LIVER_CENTER_RAS = np.array([70.0, 10.0, 20.0])  # RAS +x points to the patient's right, where the liver is
LIVER_RADII = np.array([55.0, 45.0, 40.0])
LIVER_HU, BODY_HU, AIR_HU = 160, 30, -1000


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(spacing: tuple[float, float, float], shape_kji: tuple[int, int, int],
                rot: np.ndarray | None = None, left_handed: bool = False) -> np.ndarray:
    """An IJK-to-RAS matrix whose volume is centred on the RAS origin."""
    cols = (np.eye(3) if rot is None else rot) * np.asarray(spacing)
    if left_handed:
        cols[:, 2] *= -1  # K runs the other way: a left-handed index frame
    m = np.eye(4)
    m[:3, :3] = cols
    centre_ijk = (np.array(shape_kji[::-1]) - 1) / 2
    m[:3, 3] = -cols @ centre_ijk
    return m


def ras_grid(shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS coordinates of every voxel centre, shape (k, j, i, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk @ ijk_to_ras.T)[..., :3]


def phantom(shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(CT int16 [k, j, i], true liver mask uint8) for a body ellipsoid holding an ellipsoidal liver."""
    ras = ras_grid(shape_kji, ijk_to_ras)
    body = (((ras - [0, 0, 0]) / [160.0, 120.0, 400.0]) ** 2).sum(-1) <= 1
    liver = (((ras - LIVER_CENTER_RAS) / LIVER_RADII) ** 2).sum(-1) <= 1
    rng = np.random.default_rng(seed)
    ct = np.where(body, BODY_HU, AIR_HU) + rng.normal(0, 8, shape_kji)
    ct[liver] = LIVER_HU + rng.normal(0, 8, int(liver.sum()))
    return ct.astype(np.int16), liver.astype(np.uint8)


def phantom_image(shape_kji=(40, 64, 72), spacing=(4.0, 4.0, 6.0), rot=None, left_handed=False) -> tuple[sitk.Image, np.ndarray]:
    m = make_affine(spacing, shape_kji, rot, left_handed)
    ct, liver = phantom(shape_kji, m)
    return image_from_array(ct, m), liver


def write_dicom_series(folder, ct: np.ndarray, ijk_to_ras: np.ndarray, transfer_syntax: str | None = None,
                       series_uid: str | None = None, modality: str = "CT") -> list:
    """Write ``ct`` ([k, j, i] HU) as a CT DICOM series, optionally compressed (RLE, JPEG 2000...);
    ``modality`` mislabels it (the CT image storage class and the HU stay)."""
    from pathlib import Path

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    files = []
    for k in range(ct.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = modality, "Test^Phantom", "PHANTOM-001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study_uid, series_uid, k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + lps[:3, 2] * k]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = ct.shape[1], ct.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (ct[k].astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
        if transfer_syntax:
            ds.compress(transfer_syntax)
        path = folder / f"slice{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files

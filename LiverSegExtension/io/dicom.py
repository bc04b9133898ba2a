"""The slices of a DICOM series, checked from their headers: sizes, positions (missing, doubled, uneven, tilted),
the order a reader must stack them in, and the grid another reader made of them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.cases import InputCase, is_volume_file


def _frames(file: str) -> int:
    """A DICOM file's NumberOfFrames (1 when it has none or it cannot be read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        return int(reader.GetMetaData("0028|0008").strip()) if reader.HasMetaDataKey("0028|0008") else 1
    except (RuntimeError, ValueError):
        return 1


def unreadable_neighbours(case: InputCase) -> list[str]:
    """Files beside a series that are not in it and cannot be read as DICOM (cut short, damaged): the usual
    reason for a slice missing from it."""
    if not case.files:
        return []
    folder = Path(case.files[0]).parent
    members = {os.path.realpath(f) for f in case.files}
    found = []
    for file in sorted(folder.iterdir()):
        if not file.is_file() or os.path.realpath(file) in members or is_volume_file(file):
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        try:
            reader.ReadImageInformation()
            sitk.ReadImage(str(file))  # the header may be whole and the pixels cut short
        except RuntimeError:
            if file.stat().st_size > 132 and _dicm_preamble(file):
                found.append(file.name)
    return found


def _dicm_preamble(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _slice_positions(case: InputCase, reader: sitk.ImageSeriesReader) -> list[list[float]] | None:
    try:
        return [[float(v) for v in reader.GetMetaData(n, "0020|0032").split("\\")] for n in range(len(case.files))]
    except (RuntimeError, ValueError):
        return None  # no usable ImagePositionPatient: nothing to check against (ITK then stacks by order)


def check_series_layout(case: InputCase) -> None:
    """The slice checks of a series from its files' headers alone, for a door that reads it another
    way (Slicer's archetype reader stacks it as ITK does)."""
    sizes, positions, normal = _slice_headers(case.files)
    if None in sizes:
        name = Path(case.files[sizes.index(None)]).name
        raise LiverSegError(f"{case.label}: unreadable DICOM slice {name}")
    check_slice_sizes(case, sizes)
    if None not in positions and normal is not None and len(positions) > 1:
        check_slice_positions(case, positions, normal)


def series_files_in_order(case: InputCase) -> list[str]:
    """The series' files sorted by position along the slices' normal, as Slicer's DICOM plugin hands them
    to its reader (files named in another order, or a series without SeriesInstanceUID, would otherwise
    be stacked as they come)."""
    _, positions, normal = _slice_headers(case.files)
    if normal is None or None in positions:
        return list(case.files)
    heights = [float(np.dot(p, normal)) for p in positions]
    return [case.files[i] for i in np.argsort(heights, kind="stable")]


def check_loaded_grid(case: InputCase, ijk_to_ras: np.ndarray, shape_kji: tuple[int, ...]) -> None:
    """The grid another reader (Slicer's) made of a DICOM series must be the one its headers describe:
    as many slices, each where its ImagePositionPatient says, with the files' pixel spacing. Compared in
    RAS, whichever way the reader ordered K."""
    _, positions, normal = _slice_headers(case.files)
    if normal is None or None in positions:
        return
    reader = sitk.ImageFileReader()
    reader.SetFileName(case.files[0])
    reader.ReadImageInformation()
    columns, rows = reader.GetSize()[:2]
    heights = np.array([float(np.dot(p, normal)) for p in positions])
    lps = np.asarray(positions, dtype=float)[np.argsort(heights)]
    ras = lps * [-1.0, -1.0, 1.0]
    step = float(np.median(np.abs(np.diff(np.sort(heights))))) if len(heights) > 1 else 1.0
    tolerance = max(0.01, 0.05 * min(step, *reader.GetSpacing()[:2]))
    ends = [(ijk_to_ras @ [0, 0, k, 1.0])[:3] for k in (0, shape_kji[0] - 1)]
    spacing = np.linalg.norm(np.asarray(ijk_to_ras)[:3, :3], axis=0)
    same_ends = any(np.allclose(ends, pair, atol=tolerance) for pair in ([ras[0], ras[-1]], [ras[-1], ras[0]]))
    if (tuple(shape_kji) != (len(positions), rows, columns) or not same_ends
            or not np.allclose(spacing[:2], reader.GetSpacing()[:2], atol=tolerance)):
        raise LiverSegError(f"{case.label}: the reader stacked the series on another grid than its headers give "
                            f"({'x'.join(map(str, shape_kji[::-1]))} voxels of {', '.join(f'{v:.3g}' for v in spacing)} mm, "
                            f"for {columns}x{rows}x{len(positions)} slices {step:.3g} mm apart): refused rather than "
                            "segmented on a wrong grid")


def check_slice_sizes(case: InputCase, sizes: list[tuple[int, ...] | None]) -> None:
    """ITK names only the odd slice's size ("Size: [256, 256, 1]"); say which file it is and why it matters."""
    known = [size for size in sizes if size is not None]
    if not known:
        return
    common = max(set(known), key=known.count)
    for file, size in zip(case.files, sizes):
        if size is not None and size != common:
            raise LiverSegError(f"{case.label}: slice {Path(file).name} is {size[0]}x{size[1]} pixels, the others "
                                f"{common[0]}x{common[1]}: not one volume (a localizer or another series mixed in?)")


def _slice_headers(files: tuple[str, ...]) -> tuple[list, list, np.ndarray | None]:
    """Each slice's size and ImagePositionPatient (None where unreadable) and the first slice's normal."""
    sizes: list[tuple[int, ...] | None] = []
    positions: list[list[float] | None] = []
    normal = None
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            sizes.append(None)
            positions.append(None)
            continue
        sizes.append(tuple(reader.GetSize()[:2]))
        try:
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        except (RuntimeError, ValueError):
            positions.append(None)
        if normal is None:
            normal = np.array(reader.GetDirection()).reshape(3, 3)[:, 2]
    return sizes, positions, normal


def check_slice_positions(case: InputCase, positions: list[list[float]], normal: np.ndarray) -> None:
    """ITK builds the grid from the first slices and the average spacing: duplicated slices, missing
    ones and uneven spacing would give a wrong grid without a word. Refuse them, with the files."""
    heights = [float(np.dot(p, normal)) for p in positions]
    steps = np.diff(heights)
    step = float(np.median(np.abs(steps)))
    if step < 1e-3:
        raise LiverSegError(f"{case.label}: the slices do not advance along the series' axis")
    names = [Path(f).name for f in case.files]
    order = np.argsort(heights)
    for a, b in zip(order[:-1], order[1:]):
        if abs(heights[b] - heights[a]) < 0.01 * step:
            raise LiverSegError(f"{case.label}: two slices at the same position ({names[a]}, {names[b]}): "
                                "duplicated files? remove them, or keep one series per folder")
    if not (np.all(steps > 0) or np.all(steps < 0)):
        raise LiverSegError(f"{case.label}: the slice positions go back and forth; not one volume")
    # A tilted gantry: each slice is shifted within its plane, so the stack is sheared. ITK would stack the
    # slices square, placing the far ones centimetres from where they are; refuse instead, in every door.
    points = np.asarray(positions, dtype=float)[order]
    drift = np.linalg.norm((points[-1] - points[0]) - np.dot(points[-1] - points[0], normal) * normal)
    tilt = float(np.degrees(np.arctan2(drift, abs(heights[order[-1]] - heights[order[0]]))))
    if tilt > 0.1:
        raise LiverSegError(f"{case.label}: the slices are sheared against their orientation (a gantry tilt of "
                            f"{tilt:.1f} degrees: the last slice lies {drift:.1f} mm off a square stack); "
                            "LiverSeg needs an orthogonal grid: resample the series first (e.g. dcm2niix or "
                            "Slicer's DICOM module, which correct the tilt)")
    uneven = np.abs(np.abs(steps) - step) > max(0.01, 0.1 * step)
    if uneven.any():
        n = int(np.argmax(uneven))
        broken = unreadable_neighbours(case)
        if broken:
            raise LiverSegError(f"{case.label}: DICOM file {broken[0]} in the series' folder is unreadable (cut short "
                                f"or damaged), and a slice is missing between {names[n]} and {names[n + 1]}: "
                                "replace the file")
        raise LiverSegError(f"{case.label}: uneven slice spacing ({step:.2f} mm, but {abs(steps[n]):.2f} mm between "
                            f"{names[n]} and {names[n + 1]}): a slice missing, or two series mixed")

"""Reading CT volumes (NIfTI, NRRD, MHA/MHD, DICOM series, compressed or not) and writing masks atomically."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import secrets
import socket
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverSegExtension.compact_read import WIDE_TYPES, data_files, fits_int16, layout_of, read_compact
from LiverSegExtension.errors import LiverSegError, OutputExistsError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
OUTPUT_FORMATS = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "seg.nrrd": ".seg.nrrd", "dicom-seg": ".dcm"}
#: where ``--probabilities`` goes for each mask format: a volume format (SEG and .seg.nrrd hold masks only)
PROBABILITY_FORMATS = {"nii.gz": "nii.gz", "nrrd": "nrrd", "seg.nrrd": "nrrd", "dicom-seg": "nii.gz"}

LIVER_SEGMENT = {
    "name": "Liver",
    "color": (221, 130, 101),
    # Slicer terminology string: context~category(code^scheme^meaning)~type~modifier~anatomic context...
    "terminology": "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^",
}


@dataclass
class InputCase:
    """One volume to segment: a file, or one series of a DICOM folder."""

    source: Path
    series_uid: str | None = None
    files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        source = display_path(self.source)
        return f"{source} (series {self.series_uid})" if self.series_uid else source

    @property
    def stem(self) -> str:
        name = self.source.name
        for ext in VOLUME_SUFFIXES:
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
                break
        if self.series_uid:
            name = f"{name}_{self.series_uid.split('.')[-1]}"
        return name


def display_path(path: str | Path) -> str:
    """A path as text that can be printed and written to a CSV file: bytes of a file name that are not
    UTF-8 (a Latin-1 name) are shown as ``\\xe9``."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def check_name_encoding(path: str | Path) -> None:
    """ITK's C++ aborts the whole process on a file name that is not UTF-8: refuse it first, in one line."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise LiverSegError(f"{display_path(path)}: the file name is not valid UTF-8 (bytes of another encoding); "
                            "rename the file or folder") from None


def is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def is_liverseg_output(path: Path) -> bool:
    """A file LiverSeg writes (``<name>_liver.<format>``, ``<name>_liver_prob.<format>``): never a CT."""
    name = path.name.lower()
    return any(name.endswith(f"_liver{ext}") or name.endswith(f"_liver_prob{ext}") for ext in OUTPUT_FORMATS.values())


def search_folder(folder: Path, skip: tuple[Path, ...] = ()) -> tuple[list[Path], list[Path]]:
    """The folders under ``folder`` (itself included) and the volume files in them, each real location
    once: symlinked folders are followed (data is often linked in), but a link back up, or two links to
    one folder, would otherwise give the same series twice or loop. LiverSeg's own outputs, and the
    folders in ``skip`` (the output folder), are left out: a rerun into a folder inside the inputs must
    not take the first run's masks for CTs."""
    directories: list[Path] = []
    volumes: list[Path] = []
    # An output folder below the searched one is skipped; the searched folder itself is not (outputs written
    # into it are left out by their names).
    seen_dirs: set[str] = {os.path.realpath(s) for s in skip} - {os.path.realpath(folder)}
    seen_files: set[str] = set()
    for top, subdirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen_dirs:
            subdirs[:] = []
            continue
        seen_dirs.add(real)
        # Real folders and files before links to them: a case is named after where it lies.
        subdirs.sort(key=lambda d: (os.path.islink(os.path.join(top, d)), d))
        directories.append(Path(top))
        for name in sorted(files, key=lambda f: (os.path.islink(os.path.join(top, f)), f)):
            file = Path(top) / name
            if is_volume_file(file) and not is_liverseg_output(file) and (key := os.path.realpath(file)) not in seen_files:
                seen_files.add(key)
                volumes.append(file)
    return sorted(directories), sorted(volumes)


NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG", "DOC"}


def _modality(file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData("0008|0060").strip().upper() if reader.HasMetaDataKey("0008|0060") else ""
    except RuntimeError:
        return ""


def dicom_series(folder: Path, skip: tuple[Path, ...] = ()) -> list[InputCase]:
    """One case per DICOM image series found in ``folder`` and below it (SEG, RTSTRUCT... are skipped)."""
    found: list[tuple[Path, str, tuple[str, ...]]] = []
    for directory in search_folder(folder, skip)[0]:
        reader = sitk.ImageSeriesReader
        for uid in reader.GetGDCMSeriesIDs(str(directory)) or ():
            files = reader.GetGDCMSeriesFileNames(str(directory), uid)
            if files and _modality(files[0]) not in NON_IMAGE_MODALITIES:
                found.append((directory, uid, tuple(files)))
    per_dir: dict[Path, int] = {}
    for directory, _, _ in found:
        per_dir[directory] = per_dir.get(directory, 0) + 1
    # The series UID goes into the case name only where a folder holds several series.
    return [InputCase(d, uid if per_dir[d] > 1 else None, files) for d, uid, files in found]


def expand_inputs(paths: list[str | Path], output_dir: Path | None = None,
                  notes: list[str] | None = None) -> list[InputCase]:
    """Turn command-line paths into cases, the same for every door: a file is a case; a folder is searched
    for volume files and DICOM image series (one case per series), leaving out ``output_dir`` and
    LiverSeg's own outputs.

    Missing paths and folders with nothing readable become cases too, so they fail with their reason
    in the summary instead of stopping the run. A case given twice (the same file or series, by any
    path) is segmented once; ``notes`` gets a line saying so.
    """
    skip = (Path(output_dir),) if output_dir is not None else ()
    cases: list[InputCase] = []
    seen: dict[tuple[str, str], InputCase] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = [InputCase(f) for f in search_folder(path, skip)[1]] + dicom_series(path, skip)
            found = found or [InputCase(path)]
        else:
            found = [InputCase(path)]
        for case in found:
            key = (os.path.realpath(case.files[0] if case.files else case.source), case.series_uid or "")
            if key in seen:
                if notes is not None:
                    notes.append(f"{case.label}: the same input as {seen[key].label}; segmented once")
                continue
            seen[key] = case
            cases.append(case)
    return cases


def parse_shard(text: str | None) -> tuple[int, int]:
    """``I/N`` (1-based) as ``(I, N)``; ``(1, 1)`` when not given. A ValueError says what is wrong."""
    if not text:
        return 1, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 1/4), got {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard I/N needs 1 <= I <= N, got {text!r}")
    return i, n


def shard(cases: list[InputCase], i: int, n: int) -> list[InputCase]:
    """Cases I, I+N, I+2N... (1-based) of the case list sorted by input: shards partition it, whatever
    order the inputs were given in."""
    return sorted(cases, key=lambda c: c.label)[i - 1 :: n]


def output_names(cases: list[InputCase]) -> list[str]:
    """One output name per case (its stem; ``_2``, ``_3``... where stems repeat), for every door."""
    taken: set[str] = set()
    names = []
    for case in cases:
        name, n = case.stem, 2
        while name in taken:
            name, n = f"{case.stem}_{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


def mask_path(out_dir: Path, name: str, fmt: str) -> Path:
    """Where a door writes a case's mask: ``OUT/<name>_liver.<format>``."""
    return Path(out_dir) / f"{name}_liver{OUTPUT_FORMATS[fmt]}"


def probability_path(out_dir: Path, name: str, fmt: str) -> Path:
    """Where ``--probabilities`` writes a case's liver probability: ``OUT/<name>_liver_prob.<volume format>``."""
    return Path(out_dir) / f"{name}_liver_prob{OUTPUT_FORMATS[PROBABILITY_FORMATS[fmt]]}"


def quiet_native_logs(debug: bool) -> None:
    """ITK's and VTK's own warnings (\"No Series were found\" for every folder without DICOM, MRML's
    display-node notes) go to the terminal only with --debug; LiverSeg says what matters in one line."""
    sitk.ProcessObject.SetGlobalWarningDisplay(debug)
    vtk = sys.modules.get("vtkmodules.vtkCommonCore")  # only where VTK is in use (the batch): importing it costs 0.7 s
    if vtk is not None:
        vtk.vtkObject.SetGlobalWarningDisplay(int(debug))


def read_case(case: InputCase) -> sitk.Image:
    for name in case.files or (case.source,):
        check_name_encoding(name)
    if case.files:
        return _read_dicom(case)
    return read_image(case.source)


def _read_dicom(case: InputCase) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(case.files))
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the check below
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        check_slice_sizes(case, _slice_headers(case.files)[0])  # the usual cause, named with its file
        raise LiverSegError(f"{case.label}: unreadable DICOM series ({_first_line(exc)})") from None
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        frames = _frames(case.files[0])
        if frames > 1:
            raise LiverSegError(f"{case.label}: an enhanced (multi-frame) DICOM image, {frames} frames in one file: "
                                "LiverSeg reads classic series of one slice per file; convert it first (dcm2niix, "
                                "or load it in Slicer's DICOM module)")
        raise LiverSegError(f"{case.label}: a single-slice DICOM series is not a 3D volume")
    positions = _slice_positions(case, reader)
    if positions is not None:
        check_slice_positions(case, positions, np.array(image.GetDirection()).reshape(3, 3)[:, 2])
    return _to_compact_type(image)


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


def input_grid(case: InputCase) -> sitk.Image:
    """An empty uint8 image on the grid the engine reads for ``case``: from the header alone for a
    volume file (the voxels are not read again), from the series for DICOM (ITK computes its grid)."""
    if case.files:
        image = read_case(case)
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(case.source))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise LiverSegError(f"{case.label}: {_first_line(exc)}") from None
        check_directions(case.source, reader.GetDirection())
        image = sitk.Image([int(v) for v in reader.GetSize()], sitk.sitkUInt8)
        image.SetOrigin(reader.GetOrigin())
        image.SetSpacing(reader.GetSpacing())
        image.SetDirection(reader.GetDirection())
        return image
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return grid


def read_image(path: str | Path) -> sitk.Image:
    """Read a volume file or a DICOM folder (its only series), with a one-line error for bad input."""
    path = Path(path)
    check_name_encoding(path)
    if not path.exists():
        raise LiverSegError(f"{path}: no such file or folder")
    if path.is_dir():
        series = dicom_series(path)
        if not series:
            volumes = search_folder(path)[1]
            if volumes:
                raise LiverSegError(f"{path}: folder holds {len(volumes)} volume file(s) and no DICOM series; "
                                    "give the files, or the folder to segment each")
            raise LiverSegError(f"{path}: folder holds no volume file or DICOM image series")
        if len(series) > 1:
            raise LiverSegError(f"{path}: folder holds {len(series)} DICOM series; pick one")
        return read_case(series[0])
    if path.stat().st_size == 0:
        raise LiverSegError(f"{path}: file is empty")
    check_data_files_beside(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        if reader.GetDimension() == 4 or reader.GetNumberOfComponents() > 1:
            raise LiverSegError(f"{path}: 4D or multi-component image; LiverSeg needs one 3D CT volume")
        if reader.GetDimension() != 3:
            raise LiverSegError(f"{path}: {reader.GetDimension()}D image; LiverSeg needs a 3D CT volume")
        check_directions(path, reader.GetDirection())
        layout = layout_of(path) if reader.GetPixelID() in WIDE_TYPES else None
        if path.name.lower().endswith((".nii", ".nii.gz")):
            check_nifti_length(path, check_stream=layout is None)  # the chunked reader checks the stream itself
        if layout is not None:  # float64 and the like: never held whole in the file's type
            return read_compact(path, reader, layout)
        image = reader.Execute()
    except MemoryError:
        raise LiverSegError(f"{path}: {not_enough_memory(reader)}") from None
    except RuntimeError as exc:
        if is_allocation_failure(exc):
            raise LiverSegError(f"{path}: {not_enough_memory(reader)}") from None
        if path.name.lower().endswith((".nii", ".nii.gz")):
            check_nifti_length(path)  # a damaged stream also defeats ITK's header read: say that, if so
        reason = _first_line(exc)
        if "Unable to determine ImageIO" in reason or "Could not create IO" in reason:
            reason = "not an image file LiverSeg can read (NIfTI, NRRD, MHA/MHD or a DICOM folder)"
        raise LiverSegError(f"{path}: {reason}") from None
    return _to_compact_type(image)


def check_data_files_beside(path: Path) -> None:
    """A header (NRRD, MetaImage) may read its voxels from any file on the machine; LiverSeg reads only data
    files in the header's own folder (or below it), so that a file handed over never leads elsewhere (and
    ``dataset add`` never copies another file's bytes into a dataset)."""
    home = os.path.realpath(path.parent)
    for name in data_files(path):
        target = os.path.realpath(os.path.join(path.parent, os.path.expanduser(name)))
        if os.path.commonpath([home, target]) != home:
            raise LiverSegError(f"{path}: its header reads the voxels from {name}, outside the header's folder; "
                                "LiverSeg reads data files only beside their header (move the data next to it)")


def check_directions(path: Path, direction: tuple[float, ...]) -> None:
    """ITK refuses a degenerate direction matrix only when it reads the voxels, and names it by its last
    row ("0 0 1"): say which axes coincide before any voxel is read."""
    axes = np.array(direction, dtype=float).reshape(3, 3).T  # one row per image axis (i, j, k)
    lengths = np.linalg.norm(axes, axis=1)
    if not np.all(np.isfinite(axes)) or lengths.min() < 1e-6:
        raise LiverSegError(f"{path}: the header gives an image axis no direction; not a 3D grid")
    unit = axes / lengths[:, None]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if abs(float(unit[a] @ unit[b])) > 1 - 1e-6:
            raise LiverSegError(f"{path}: the header's directions for axes {'ijk'[a]} and {'ijk'[b]} are the same "
                                "line (collinear space directions); not a 3D grid")


def memory_bytes() -> int:
    """This machine's physical memory (0 where it cannot be told)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


#: deflate cannot compress more than about 1032:1; a header that claims more is lying about its size
MAX_GZIP_RATIO = 1032


def check_nifti_length(path: Path, check_stream: bool = True) -> None:
    """ITK fills a truncated NIfTI with zeros without a word, and allocates whatever the header claims
    before it reads a byte: check the claim first, against this machine's memory and (for .nii.gz) against
    what the compressed stream can hold, then the data's real length.

    For .nii.gz the gzip trailer holds the uncompressed length (mod 2**32); with ``check_stream`` the
    stream is also decompressed once, without keeping it, for its real length and its CRC (ITK checks
    neither).
    """
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(352)
    except (OSError, EOFError) as exc:
        raise LiverSegError(f"{path}: truncated or corrupt file ({exc})") from None
    if len(header) < 348:
        raise LiverSegError(f"{path}: truncated file (incomplete NIfTI header)")
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return  # not NIfTI-1; let ITK decide
    dims = struct.unpack(endian + "8h", header[40:56])
    pixdim = struct.unpack(endian + "8f", header[76:108])[1 : 1 + max(0, min(dims[0], 3))]
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        # ITK would take 1 mm for a zero or NaN spacing, and a negative one as a flip, without a word.
        raise LiverSegError(f"{path}: the header's voxel spacing (pixdim {', '.join(f'{v:g}' for v in pixdim)}) "
                            "is not a positive size in mm")
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    offset = int(struct.unpack(endian + "f", header[108:112])[0])
    shape = [max(1, d) for d in dims[1 : 1 + max(0, min(dims[0], 7))]]
    expected = offset + int(np.prod(shape, dtype=np.int64)) * max(bitpix, 8) // 8
    size = path.stat().st_size
    claimed = f"{expected / 1e9:.1f} GB of voxels ({'x'.join(map(str, shape))})"
    memory = memory_bytes()
    if memory and expected > memory // 2:
        raise LiverSegError(f"{path}: the header claims {claimed}, more than half of this machine's memory "
                            f"({memory / 1e9:.0f} GB): not enough memory to read it (needed about "
                            f"{3 * expected / 1e9:.0f} GB)")
    if gz and expected > MAX_GZIP_RATIO * size:
        raise LiverSegError(f"{path}: the header claims {claimed} from {size / 1e6:.2f} MB of compressed data, more "
                            "than gzip can hold: a damaged or forged file")
    if gz:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            actual = struct.unpack("<I", f.read(4))[0]
        ok = actual == expected % (1 << 32)
        if ok and check_stream:  # the real length (the trailer's is mod 2**32) and the CRC, ITK checks neither
            actual = 0
            try:
                with gzip.open(path, "rb") as f:
                    while block := f.read(1 << 24):
                        actual += len(block)
                        if actual > expected:
                            break
            except (OSError, EOFError, zlib.error) as exc:
                raise LiverSegError(f"{path}: corrupt compressed data ({exc})") from None
            ok = actual == expected
    else:
        actual = size
        ok = actual >= expected
    if not ok:
        held = f"the compressed stream holds {actual}" if gz else f"file holds {actual}"
        raise LiverSegError(f"{path}: truncated or damaged file (header promises {expected} bytes, {held})")


def is_allocation_failure(exc: BaseException) -> bool:
    """ITK's, NIfTI's and ONNX Runtime's words for an allocation that failed."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(
        words in text for words in ("bad_alloc", "failed to allocate", "out of memory", "nifti_image_load failed",
                                    "memory allocation", "cannot allocate memory"))


def not_enough_memory(reader: sitk.ImageFileReader | None = None, voxels: int = 0) -> str:
    """"not enough memory (needed about N GB)", N from the image's size: LiverSeg's peak is about three times
    the CT's int16 voxels plus the runtime (benchmarks/peak_memory.py)."""
    try:
        if reader is not None:
            voxels = int(np.prod(reader.GetSize(), dtype=np.int64))
    except RuntimeError:
        voxels = 0
    if not voxels:
        return "not enough memory"
    return f"not enough memory (needed about {max(1.0, (6 * voxels + 0.4e9) / 1e9):.0f} GB)"


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with file/line noise; the last line usually holds the reason.
    msg = lines[-1] if lines else type(exc).__name__
    return msg.split(": ", 1)[-1] if msg.startswith(("itk::", "/")) else msg


def _to_compact_type(image: sitk.Image) -> sitk.Image:
    """Whole-numbered CTs in int16's range become int16 (half the memory, the same HU), other floats
    float32: the same rule as the chunked reader's, so a volume's type never changes what it gives."""
    if image.GetPixelID() in (sitk.sitkInt16, sitk.sitkUInt8, sitk.sitkInt8) or image.GetNumberOfComponentsPerPixel() > 1:
        return image
    view = sitk.GetArrayViewFromImage(image)
    if view.size and fits_int16(view):
        return sitk.Cast(image, sitk.sitkInt16)
    if np.issubdtype(view.dtype, np.floating) and view.dtype != np.float32:
        return sitk.Cast(image, sitk.sitkFloat32)
    return image


# -- writing ---------------------------------------------------------------------------------------
SUMMARY_FIELDS = ["input", "output", "status", "liver_ml", "uncertainty", "seconds", "error", "warning", "runtime"]
STATUSES = ("ok", "warning", "empty", "skipped", "failed")


def status_counts(rows: list[dict]) -> str:
    """``2 ok, 1 failed``: how a run's cases ended, for the last line of every door."""
    return ", ".join(f"{sum(r['status'] == k for r in rows)} {k}" for k in STATUSES if any(r["status"] == k for r in rows)) \
        or "none"


def result_status(liver_ml: float, warnings: list[str]) -> str:
    """The summary status of a segmented case, the same in every door: ``empty`` (no liver found),
    ``warning`` (a mask was made but may be wrong: too small, or the header misstates the anatomy) or ``ok``."""
    if liver_ml == 0:
        return "empty"
    return "warning" if warnings else "ok"


def case_warnings(case: InputCase, warnings: list[str]) -> list[str]:
    """The engine's warnings for a segmented case, and the doors' own: a DICOM series that says it is not
    CT (an MR series with CT-like values has passed the CT check, so it was segmented as CT)."""
    if not case.files:  # a NIfTI file whose two placements of the grid disagree: say which one was used
        from LiverSegExtension.nifti_header import disagreement

        note = disagreement(case.source)
        return [*warnings, note] if note else list(warnings)
    modality = _modality(case.files[0])
    if modality and modality != "CT":
        return [*warnings, f"{case.label}: the series' Modality is {modality}, not CT, though its values look like "
                           "CT in HU; it was segmented as CT: check that this is the right series"]
    return list(warnings)


def summary_row(source: str, output: str) -> dict[str, str]:
    """A summary.csv row for one case before it runs: status ok, every other field empty."""
    return {**dict.fromkeys(SUMMARY_FIELDS, ""), "input": source, "output": output, "status": "ok"}


def write_summary(path: Path, rows: list[dict]) -> None:
    """Record this run's rows in ``summary.csv``, merged with what it already holds.

    Rows of earlier runs are kept: a row is replaced only by a newer row for the same input, and a
    "skipped" row never replaces the row that recorded how the output was made. The file is read,
    merged and replaced under a lock, so concurrent runs into one folder lose no rows; the replacement
    is atomic, so an interrupted run still leaves a whole summary.
    """
    path = Path(path)
    with locked(path.parent, f".{path.name}.lock"):
        merged: dict[str, dict] = {}
        if path.exists():
            try:
                with open(path, newline="") as f:
                    for old in csv.DictReader(f):
                        if old.get("input"):
                            merged[old["input"]] = {k: old.get(k) or "" for k in SUMMARY_FIELDS}
            except (OSError, UnicodeDecodeError, csv.Error) as exc:
                raise LiverSegError(f"{path}: unreadable summary ({exc}); move it away to start a new one") from None
        for row in rows:
            if row["status"] != "skipped" or row["input"] not in merged:
                merged[row["input"]] = row
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()), overwrite=True)
        except OSError as exc:  # a full disk: the summary as it was stays whole
            raise LiverSegError(f"{path}: could not be written ({exc.strerror or exc}); it still holds the rows "
                                f"before this case ({', '.join(r['input'] for r in rows)})") from None


def merge_shard_summaries(folder: Path) -> tuple[int, list[str]]:
    """Merge ``folder/summary_shardIofN.csv`` into ``folder/summary.csv`` (with :func:`write_summary`'s rules);
    returns the number of rows read and the shards ``I/N`` with no summary."""
    import re

    folder = Path(folder)
    shards = {}
    for path in sorted(folder.glob("summary_shard*of*.csv")):
        match = re.fullmatch(r"summary_shard(\d+)of(\d+)\.csv", path.name)
        if match:
            shards[(int(match.group(1)), int(match.group(2)))] = path
    if not shards:
        raise LiverSegError(f"{folder}: no shard summaries (summary_shardIofN.csv) to merge")
    counts = {n for _, n in shards}
    if len(counts) > 1:
        raise LiverSegError(f"{folder}: shard summaries of different splits ({', '.join(f'of {n}' for n in sorted(counts))}): "
                            "merge the ones of one run")
    (n,) = counts
    rows = []
    for key in sorted(shards):
        try:
            with open(shards[key], newline="", encoding="utf-8") as f:
                rows += [{k: row.get(k) or "" for k in SUMMARY_FIELDS} for row in csv.DictReader(f) if row.get("input")]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise LiverSegError(f"{shards[key]}: unreadable summary ({exc})") from None
    write_summary(folder / "summary.csv", rows)
    return len(rows), [f"{i}/{n}" for i in range(1, n + 1) if (i, n) not in shards]


@contextlib.contextmanager
def locked(folder: Path, name: str) -> Iterator[None]:
    """An exclusive lock, shared by all processes (Slicer instances, CLI runs), on ``folder/name``.

    The lock file is removed on release. A waiter that then holds a lock on the removed file notices
    (the path no longer names the file it locked) and takes the lock again on the current one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        handle = open(path, "a+b")
        try:
            _lock(handle)
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # releases the stale lock
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # Windows cannot remove an open file: it stays, harmless
            os.unlink(path)
        handle.close()


def _lock(handle) -> None:  # noqa: ANN001 - a binary file object
    if os.name == "nt":
        import msvcrt

        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                return
            except OSError:
                continue
    import fcntl

    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def check_writable_folder(folder: Path) -> None:
    """Make ``folder`` if needed and check that files can be created in it, before any work is done."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise LiverSegError(f"{folder}: a symbolic link to {os.readlink(folder)}, which does not exist")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".liverseg-write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LiverSegError(f"{folder}: cannot write output there ({reason})") from None


def complete_output(path: Path) -> bool:
    """True when an existing output is a whole, readable image (a rerun skips it); False when it is
    truncated or unreadable (a rerun must not count it as done)."""
    try:
        if path.name.lower().endswith(".dcm"):
            import pydicom

            return bool(getattr(pydicom.dcmread(path, stop_before_pixels=True), "SOPInstanceUID", ""))
        if path.name.lower().endswith((".nii", ".nii.gz")):
            check_nifti_length(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return True
    except Exception:  # noqa: BLE001 - whatever the reader says, the file is not a whole output
        return False


def mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 mask image with exactly the geometry of ``reference``."""
    out = sitk.GetImageFromArray(mask.astype(np.uint8, copy=False))
    out.CopyInformation(reference)
    return out


TEMP_MARK = ".liverseg-tmp-"
_HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
STALE_SECONDS = 24 * 3600  # another host's temporary: removed only when this old


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove what a killed writer left in ``folder``: temporaries of processes of this host that no longer
    run (or of other hosts, once a day old). Work in progress of a concurrent run is left alone."""
    removed = []
    try:
        candidates = [p for p in Path(folder).iterdir() if p.name.startswith(".") and TEMP_MARK in p.name]
    except OSError:
        return removed
    for path in candidates:
        writer = path.name.split(TEMP_MARK, 1)[1].split("-")
        try:
            host, pid = writer[0], int(writer[1])
        except (IndexError, ValueError):
            continue
        if host == _HOST:
            try:
                os.kill(pid, 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # someone else's live process
        else:
            try:
                if time.time() - path.stat().st_mtime < STALE_SECONDS:
                    continue
            except OSError:
                continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def atomic_write(path: Path, write_to: Callable[[str], object], overwrite: bool = False) -> None:
    """Write through a temporary file in the same folder and rename it into place, so that a crash
    never leaves a half-written file; refuse to replace an existing file unless ``overwrite``.

    ``write_to(tmp)`` creates the file itself (the name is unique but not pre-created, so writers that
    complain about replacing a file, such as Slicer's storage nodes, stay quiet)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    # Named after the writer (host and process), so that a later run can tell debris from work in progress.
    tmp = str(path.with_name(f".{path.name}{TEMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"))
    try:
        write_to(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target appeared meanwhile: never clobber a file written concurrently.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path}: already exists (use --overwrite to replace it)") from None
            os.unlink(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_mask(mask: np.ndarray, reference: sitk.Image, path: Path, overwrite: bool = False,
               header_source: Path | None = None) -> None:
    """Write a binary liver mask as .nii.gz, .nrrd or a Slicer .seg.nrrd, atomically; a file that was not
    written whole (a full disk, a file size limit: ITK does not always say) never takes its final name.
    A NIfTI mask of a NIfTI ``header_source`` gets that file's own qform and sform."""
    image = mask_image(mask, reference)
    path = Path(path)

    def write(tmp: str) -> None:
        try:
            if path.name.endswith(".seg.nrrd"):
                _write_seg_nrrd(image, tmp)
            else:
                sitk.WriteImage(image, tmp, useCompression=True)
        except RuntimeError as exc:
            raise LiverSegError(f"{path}: could not be written ({_first_line(exc)})") from None
        if header_source is not None and path.name.lower().endswith((".nii", ".nii.gz")):
            from LiverSegExtension.nifti_header import copy_transforms

            copy_transforms(header_source, tmp)
        if not complete_output(Path(tmp)):
            raise LiverSegError(f"{path}: could not be written whole (is the disk full, or a file size limit set?)")

    atomic_write(path, write, overwrite)


def _write_seg_nrrd(image: sitk.Image, path: str) -> None:
    """A Slicer segmentation file: one binary labelmap layer holding the segment "Liver"."""
    r, g, b = (c / 255.0 for c in LIVER_SEGMENT["color"])
    fields = {
        "Segment0_ID": "Liver",
        "Segment0_Name": LIVER_SEGMENT["name"],
        "Segment0_Color": f"{r:.6f} {g:.6f} {b:.6f}",
        "Segment0_ColorAutoGenerated": "0",
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
        "Segment0_NameAutoGenerated": "0",
        "Segment0_Tags": f"TerminologyEntry:{LIVER_SEGMENT['terminology']}|",
        "Segment0_Extent": " ".join(str(v) for v in _extent(image)),
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": "",
    }
    for key, value in fields.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, path, useCompression=True)


def _extent(image: sitk.Image) -> list[int]:
    arr = sitk.GetArrayViewFromImage(image)
    nz = np.argwhere(arr > 0)
    if nz.size == 0:
        return [0, -1, 0, -1, 0, -1]
    lo, hi = nz.min(axis=0)[::-1], nz.max(axis=0)[::-1]
    return [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]

"""The cases a door is given: volume files and DICOM series found in folders, each named once, shards, and
where each case's outputs go."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io.formats import OUTPUT_FORMATS, is_volume_name, split_suffix, volume_stem

#: where ``--probabilities`` goes for each mask format: a volume format (SEG and .seg.nrrd hold masks only)
PROBABILITY_FORMATS = {"nii.gz": "nii.gz", "nrrd": "nrrd", "seg.nrrd": "nrrd", "dicom-seg": "nii.gz"}

#: the suffixes ``--probabilities`` writes, beside a mask
PROBABILITY_SUFFIXES = tuple(dict.fromkeys(OUTPUT_FORMATS[f] for f in PROBABILITY_FORMATS.values()))

#: what LiverSeg puts between a case's name and the format: ``<name>_liver.<format>``, ``<name>_liver_prob.<format>``
MASK_MARK, PROBABILITY_MARK = "_liver", "_liver_prob"


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
    #: the folder given by the user that this case was found in (None: the case was given itself); its output
    #: mirrors the case's place under that folder
    root: Path | None = None

    @property
    def label(self) -> str:
        source = display_path(self.source)
        return f"{source} (series {self.series_uid})" if self.series_uid else source

    @property
    def stem(self) -> str:
        name = volume_stem(self.source)
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
    return path.is_file() and is_volume_name(path)


def output_stem(name: str | Path, marks: tuple[str, ...] = (MASK_MARK,)) -> str | None:
    """The case name in the name of a file LiverSeg writes, folders kept (``a/ct`` for ``a/ct_liver.nii.gz``; with
    ``marks`` holding PROBABILITY_MARK, for ``a/ct_liver_prob.nrrd`` too), in any case; None for another name."""
    stem, suffix = split_suffix(name)
    if suffix.lower() not in OUTPUT_FORMATS.values():
        return None
    mark = next((m for m in marks if stem.lower().endswith(m)), None)
    return stem[: len(stem) - len(mark)] if mark is not None else None


def is_liverseg_output(path: Path) -> bool:
    """A file LiverSeg writes (``<name>_liver.<format>``, ``<name>_liver_prob.<format>``): never a CT."""
    return output_stem(path.name, (MASK_MARK, PROBABILITY_MARK)) is not None


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
            found = [InputCase(c.source, c.series_uid, c.files, path) for c in found] or [InputCase(path)]
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


def _name_parts(case: InputCase) -> list[str]:
    """A case's name as folders and a stem: its place under the folder it was found in (``a/ct`` for
    ``cohort/a/ct.nii.gz``), or its stem alone when it was given itself."""
    parts = [case.stem]
    if case.root is not None:
        location = case.source.parent if case.source != case.root else case.root.parent
        try:
            relative = Path(os.path.relpath(location, case.root)).parts if case.source != case.root else ()
        except ValueError:  # another drive (Windows)
            relative = ()
        parts = [p for p in relative if p not in (".", "..")] + parts
    return parts


def output_names(cases: list[InputCase]) -> list[str]:
    """One output name per case, a function of the whole input list (the same in every shard, whatever the
    order of inputs, shards and runs): ``a/ct`` for ``cohort/a/ct.nii.gz`` found in ``cohort``, ``ct`` for
    ``ct.nii.gz`` given itself. Names that would collide (ignoring case: some file systems do) take folders
    above them until they differ (``a/ct`` and ``b/ct`` for two files given as ``a/ct.nii.gz b/ct.nii.gz``);
    names still equal (``ct.nii.gz`` and ``ct.nrrd`` side by side) take ``_2``, ``_3``... in the order of
    their resolved paths."""
    parts = [_name_parts(c) for c in cases]
    above = []  # the folders above those already in each name, nearest last
    for c, p in zip(cases, parts):
        folders = [f for f in Path(os.path.abspath(c.source)).parent.parts if f != Path(f).anchor]
        above.append(folders[: len(folders) - (len(p) - 1)])
    for _ in range(64):
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(parts):
            groups.setdefault("/".join(p).lower(), []).append(i)
        # only where the folders above tell the clashing names apart somewhere
        clashing = [g for g in groups.values() if len(g) > 1 and len({tuple(above[i]) for i in g}) > 1]
        if not clashing:
            break
        for group in clashing:
            for i in group:
                if above[i]:
                    parts[i] = [above[i].pop(), *parts[i]]
    names = ["/".join(p) for p in parts]
    order = sorted(range(len(cases)), key=lambda i: (os.path.realpath(cases[i].source), cases[i].series_uid or ""))
    taken: set[str] = set()
    for i in order:
        name, n = names[i], 2
        while name.lower() in taken:
            name, n = f"{names[i]}_{n}", n + 1
        taken.add(name.lower())
        names[i] = name
    return names


def mask_path(out_dir: Path, name: str, fmt: str) -> Path:
    """Where a door writes a case's mask: ``OUT/<name>_liver.<format>`` (``name`` may hold folders)."""
    return Path(out_dir) / f"{name}{MASK_MARK}{OUTPUT_FORMATS[fmt]}"


def probability_path(out_dir: Path, name: str, fmt: str) -> Path:
    """Where ``--probabilities`` writes a case's liver probability: ``OUT/<name>_liver_prob.<volume format>``."""
    return Path(out_dir) / f"{name}{PROBABILITY_MARK}{OUTPUT_FORMATS[PROBABILITY_FORMATS[fmt]]}"

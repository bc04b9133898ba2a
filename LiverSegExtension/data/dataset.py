"""Medical Segmentation Decathlon datasets built from corrected segmentations.

Adding a case is safe: the label must be a non-empty binary mask on the image's grid; names are
generated (never taken from DICOM tags, so no patient names or IDs); nothing existing is overwritten;
image, label and provenance are written first and ``dataset.json`` is replaced atomically last, under
an inter-process lock, so a crash leaves a valid dataset and concurrent exports do not lose cases.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from LiverSegExtension import __version__
from LiverSegExtension.data.metrics import dice, volume_ml
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import image_from_array, same_grid
from LiverSegExtension.io import atomic_write, clean_stale_temporaries, format_of, locked, read_image
from LiverSegExtension.io.formats import DICOM_SEG
from LiverSegExtension.model.catalog import bundled_model_name

LOCK_FILE = ".liverseg.lock"


def _new_meta() -> dict[str, Any]:
    return {
        "name": "liverseg-corrections",
        "description": "CT with liver masks corrected by annotators (exported by LiverSeg)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver"},
        "numTraining": 0,
        "training": [],
        "cases": {},
    }


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "dataset.json"
    if not path.exists():
        return _new_meta()
    meta = dataset_meta(folder)  # a clear error for a dataset.json that is not one
    if not isinstance(meta.setdefault("cases", {}), dict):
        raise LiverSegError(f"{path}: \"cases\" must be an object; fix or move it before adding cases")
    meta.setdefault("training", [])
    return meta


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the index: a crash leaves old or new

    atomic_write(path, write, overwrite=True)


def _new_case_name(folder: Path, meta: dict[str, Any]) -> str:
    taken = {Path(e["image"]).name.split(".")[0] for e in meta["training"]} | set(meta["cases"])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    while True:
        name = f"liverseg_{stamp}_{secrets.token_hex(3)}"
        if name not in taken and not (folder / "imagesTr" / f"{name}.nii.gz").exists():
            return name


def content_hash(image: sitk.Image) -> str:
    """sha256 of an image's voxels, type and grid: the same case exported twice has the same hash."""
    digest = hashlib.sha256()
    digest.update(repr((image.GetPixelIDValue(), image.GetSize(), [round(v, 4) for v in image.GetSpacing()],
                        [round(v, 3) for v in image.GetOrigin()], [round(v, 5) for v in image.GetDirection()])).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).data)
    return digest.hexdigest()


def add_case_images(folder: str | Path, image: sitk.Image, label: sitk.Image, provenance: dict[str, Any] | None = None,
                    draft: np.ndarray | None = None, _crash_after: str | None = None) -> str:
    """Add one case; returns its generated name. ``draft`` is the model's mask before correction."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise LiverSegError(f"{folder}: a link to {os.readlink(folder)}, which does not exist (a drive not mounted?)")
    if folder.exists() and not folder.is_dir():
        raise LiverSegError(f"{folder}: exists and is not a folder")
    lab = sitk.GetArrayViewFromImage(label)
    if not same_grid(image, label):
        raise LiverSegError("the label is not on the image's grid (size, spacing, origin and direction must match)")
    values = np.unique(lab)
    if not set(values.tolist()) <= {0, 1}:
        raise LiverSegError(f"the label is not binary (values {values[:6].tolist()}...)")
    if not lab.any():
        raise LiverSegError("the Liver segment is empty: nothing to export")
    record: dict[str, Any] = {
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "liverseg_version": __version__,
        "bundled_model": bundled_model_name(),
        "liver_ml": volume_ml(lab, image.GetSpacing()),
        "size": list(image.GetSize()),
        "spacing_mm": [round(s, 4) for s in image.GetSpacing()],
        **{k: v for k, v in (provenance or {}).items() if v not in (None, "")},
    }
    if draft is not None:
        final = lab > 0
        was = np.asarray(draft) > 0
        if was.shape != final.shape:
            raise LiverSegError("the draft mask does not have the label's shape")
        changed = int(np.logical_xor(was, final).sum())
        record["draft_changed_voxels"] = changed
        record["draft_changed_fraction"] = changed / max(1, int(np.logical_or(was, final).sum()))
        record["draft_final_dice"] = dice(was, final)

    label_u8 = sitk.Cast(label, sitk.sitkUInt8)
    record["image_sha256"], record["label_sha256"] = content_hash(image), content_hash(label_u8)
    with locked(folder, LOCK_FILE):
        for sub in (folder, folder / "imagesTr", folder / "labelsTr", folder / "provenance"):
            clean_stale_temporaries(sub)  # what a killed export left
        meta = _read_meta(folder)
        for other, entry in meta["cases"].items():
            if isinstance(entry, dict) and (entry.get("image_sha256"), entry.get("label_sha256")) == (
                    record["image_sha256"], record["label_sha256"]):
                raise LiverSegError(f"{folder}: this image and label are already case {other}; nothing added")
        name = _new_case_name(folder, meta)
        image_rel, label_rel = f"./imagesTr/{name}.nii.gz", f"./labelsTr/{name}.nii.gz"
        written = [folder / image_rel, folder / label_rel, folder / "provenance" / f"{name}.json"]
        try:
            atomic_write(written[0], lambda tmp: sitk.WriteImage(image, tmp, useCompression=True))
            if _crash_after == "image":
                raise RuntimeError("simulated crash")
            atomic_write(written[1], lambda tmp: sitk.WriteImage(label_u8, tmp, useCompression=True))
            (folder / "provenance").mkdir(exist_ok=True)
            _write_json_atomic(written[2], record)
            if _crash_after == "label":
                raise RuntimeError("simulated crash")
            meta["training"].append({"image": image_rel, "label": label_rel})
            meta["cases"][name] = {"image": image_rel, "label": label_rel, **record}
            meta["numTraining"] = len(meta["training"])
            _write_json_atomic(folder / "dataset.json", meta)
        except BaseException:  # an error or Ctrl-C: what this case wrote goes (a kill leaves it to `check`)
            for path in written:
                path.unlink(missing_ok=True)
            raise
    return name


def add_case_arrays(folder: str | Path, array: np.ndarray, label: np.ndarray, ijk_to_ras: np.ndarray,
                    provenance: dict[str, Any] | None = None, draft: np.ndarray | None = None) -> str:
    """Add a ``[k, j, i]`` CT array and its mask (same shape) with their IJK-to-RAS matrix."""
    if array.shape != label.shape:
        raise LiverSegError(f"the label's shape {label.shape} differs from the image's {array.shape}")
    return add_case_images(folder, image_from_array(array, ijk_to_ras),
                           image_from_array(label.astype(np.uint8), ijk_to_ras), provenance, draft)


def add_case(folder: str | Path, image_path: str | Path, label_path: str | Path,
             provenance: dict[str, Any] | None = None, liver_values: tuple[int, ...] | None = None) -> str:
    """Add a CT file and its liver label file: a volume (0 and one label value) or a DICOM SEG of the CT
    (its segment placed on the CT's grid). ``liver_values`` names the values that are liver where a label
    holds several (``(1, 2)``: liver and tumour of a LiTS label)."""
    image = read_image(image_path)
    label = _read_label(label_path, image)
    if not same_grid(image, label):
        raise LiverSegError(f"{label_path}: not on the grid of {image_path}")
    values = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.mod(values, 1) == 0):
        # A probability map or a resampled mask: "> 0" would take its whole blurred rim (40 % more liver).
        raise LiverSegError(f"{label_path}: the label holds fractional values ({float(values.min()):g} to "
                            f"{float(values.max()):g}): a probability map or an interpolated mask, not a binary "
                            "label; threshold it (at 0.5) or resample it with nearest neighbour first")
    if not values.any():
        raise LiverSegError(f"{label_path}: the label is empty: nothing to add")
    found = [int(v) for v in np.unique(values) if v != 0]
    if liver_values:
        liver = np.isin(values, liver_values)
        if not liver.any():
            raise LiverSegError(f"{label_path}: no voxel holds {', '.join(map(str, liver_values))} (values found: "
                                f"{_listed([0, *found])})")
    elif len(found) > 1:  # LiverSeg's own probability map (0..255) taken at > 0 would add a fifth to the liver
        raise LiverSegError(f"{label_path}: not a label of one structure: values {_listed([0, *found])} found, where a "
                            "liver label holds 0 and one value. A probability map is not a label; for a label of "
                            "several structures, say which values are liver (--liver-values 1,2)")
    else:
        liver = values != 0
    binary = image_from_array(liver.astype(np.uint8), np.eye(4))
    binary.CopyInformation(image)
    record = {"source": "liverseg dataset add", "label_values": list(liver_values or found), **(provenance or {})}
    return add_case_images(folder, image, binary, record)


def _listed(values: list[int]) -> str:
    return ", ".join(map(str, values[:8])) + (f" ... ({len(values)} values)" if len(values) > 8 else "")


def _read_label(path: str | Path, image: sitk.Image) -> sitk.Image:
    """A label volume, or a DICOM SEG's liver segment on ``image``'s grid."""
    path = Path(path)
    if path.is_file() and format_of(path) is DICOM_SEG:
        from LiverSegExtension.io.dicom_seg import read_dicom_seg

        return read_dicom_seg(path, image)
    return read_image(path)


def dataset_entries(folder: str | Path) -> list[dict[str, str]]:
    """The ``training`` entries of a dataset's dataset.json, checked (see :func:`dataset_meta`)."""
    return dataset_meta(folder).get("training", [])


def dataset_meta(folder: str | Path) -> dict[str, Any]:
    """A dataset's dataset.json, read once and checked: a LiverSegError names the file and what is wrong
    (not JSON, not an object, entries without an image or label, paths that leave the folder)."""
    folder = Path(folder)
    path = folder / "dataset.json"
    if not path.is_file():
        raise LiverSegError(f"{folder}: no dataset.json")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LiverSegError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise LiverSegError(f"{path}: expected a JSON object with a \"training\" list, got {type(meta).__name__}")
    entries = meta.get("training", [])
    if not isinstance(entries, list):
        raise LiverSegError(f"{path}: \"training\" must be a list of {{\"image\", \"label\"}} entries")
    root = _lexical(folder)
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry.get(k) for k in ("image", "label")):
            raise LiverSegError(f"{path}: training entry {n} has no \"image\" and \"label\" paths")
        for key in ("image", "label"):
            if not _lexical(folder / entry[key]).is_relative_to(root):  # links inside may point anywhere
                raise LiverSegError(f"{path}: training entry {n}: {entry[key]} lies outside the dataset folder")
    return meta


def _lexical(path: Path) -> Path:
    """The absolute path with ``..`` resolved by name, symbolic links not followed."""
    return Path(os.path.normpath(os.path.abspath(path)))


def check_dataset(folder: str | Path) -> list[str]:
    """Problems found: unreadable pairs, grids that differ, labels that are not binary or are empty."""
    folder = Path(folder)
    try:
        meta = dataset_meta(folder)
    except LiverSegError as exc:
        return [str(exc)]
    entries = meta.get("training", [])
    problems = []
    if meta.get("numTraining", len(entries)) != len(entries):
        problems.append(f"dataset.json: numTraining is {meta.get('numTraining')} but {len(entries)} cases are listed")
    for entry in entries:
        try:
            image = read_image(folder / entry["image"])
            label = read_image(folder / entry["label"])
        except LiverSegError as exc:
            problems.append(str(exc))
            continue
        if not same_grid(image, label):
            problems.append(f"{entry['label']}: not on the grid of {entry['image']}")
            continue
        values = np.unique(sitk.GetArrayViewFromImage(label))
        if not set(values.tolist()) <= {0, 1}:
            problems.append(f"{entry['label']}: not binary (values {values[:6].tolist()})")
        elif values.max() == 0:
            problems.append(f"{entry['label']}: empty label")
    listed = {_lexical(folder / e[k]) for e in entries for k in ("image", "label")}
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((folder / sub).glob("*")) if (folder / sub).is_dir() else []:
            if _lexical(f) not in listed:
                kind = "unfinished temporary file (an interrupted export)" if f.name.startswith(".") else "not listed"
                problems.append(f"{f}: {kind} in dataset.json")
    return problems

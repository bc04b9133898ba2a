"""Headless batch segmentation with LiverSeg, through Slicer's own readers and writers.

Inside Slicer:   Slicer --no-main-window --python-script Scripts/LiverSegBatch.py -- --input PATH [PATH ...] --output-dir OUT
Plain Python:    python Scripts/LiverSegBatch.py --input PATH [PATH ...] --output-dir OUT     (pip install slicer-core)

It lives in Scripts/, not beside LiverSeg.py: Slicer loads every top-level .py of a scripted-modules
folder as a module at startup.

Inputs are volume files, DICOM folders (one case per series) and folders searched for both. Each case
gives OUT/<name>.seg.nrrd (segment "Liver" with its terminology) and, with --labelmap, OUT/<name>_liver.nii.gz
on the input grid. OUT/summary.csv (or summary_shardIofN.csv with --shard) has one row per case. A failed
case is recorded and the batch goes on; the exit code is 1 if any case failed, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # LiverSegLib (and, from a checkout, the engine)

import LiverSegLib  # noqa: E402,F401 - makes the engine importable
import slicer  # noqa: E402

from LiverSegExtension.errors import LiverSegError  # noqa: E402
from LiverSegExtension.io import VOLUME_SUFFIXES, atomic_write, dicom_series, summary_row, write_summary  # noqa: E402


class Case:
    def __init__(self, source: Path, archetype: Path, name: str) -> None:
        self.source, self.archetype, self.name = source, archetype, name


def find_cases(paths: list[str]) -> list[Case]:
    """Cases in a stable order (so that shards agree): files, DICOM series, and what folders hold."""
    cases: list[Case] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))
            cases += [Case(f, f, _stem(f)) for f in files]
            for series in dicom_series(path):
                cases.append(Case(series.source, Path(series.files[0]), series.stem))
            if not files and not dicom_series(path):
                cases.append(Case(path, path, path.name))
        else:
            cases.append(Case(path, path, _stem(path)))
    seen: dict[str, int] = {}
    for c in cases:  # unique output names
        n = seen.get(c.name, 0)
        seen[c.name] = n + 1
        if n:
            c.name = f"{c.name}_{n + 1}"
    return cases


def _stem(path: Path) -> str:
    name = path.name
    for ext in VOLUME_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


class SceneContext:
    """The scene and the Slicer logics to load with: Slicer's own when running in Slicer, else new ones."""

    def __init__(self) -> None:
        in_slicer = hasattr(slicer, "app") and hasattr(slicer, "modules") and hasattr(slicer.modules, "volumes")
        if in_slicer:
            self.scene = slicer.mrmlScene
            self.volumes = slicer.modules.volumes.logic()
            self.segmentations = slicer.modules.segmentations.logic()
        else:
            self.scene = slicer.vtkMRMLScene()
            self.volumes = slicer.vtkSlicerVolumesLogic()
            self.volumes.SetMRMLScene(self.scene)
            self.segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
            self.segmentations.SetMRMLScene(self.scene)  # registers the segmentation converter rules

    def load(self, case: Case):
        if not case.archetype.exists():
            raise LiverSegError(f"{case.source}: no such file or folder")
        if case.archetype.is_dir():
            raise LiverSegError(f"{case.source}: folder holds no volume file or DICOM image series")
        from LiverSegExtension.io import check_nifti_length, read_image

        if case.archetype.name.lower().endswith((".nii", ".nii.gz")):
            check_nifti_length(case.archetype)  # ITK would silently zero-fill a truncated file
        node = self.volumes.AddArchetypeVolume(str(case.archetype), case.name, 0)
        if node is None or node.GetImageData() is None:
            if node is not None:
                self.scene.RemoveNode(node)
            if case.archetype == case.source:
                read_image(case.source)  # raises with the engine's clear reason
            raise LiverSegError(f"{case.source}: Slicer could not read this volume")
        return node


def write_node(node, path: Path, overwrite: bool) -> None:
    """Write a node with its own (Slicer) storage node, atomically, never replacing a file unasked."""
    storage = node.CreateDefaultStorageNode()
    storage.SetUseCompression(True)

    def write(tmp: str) -> None:
        storage.SetFileName(tmp)
        if not storage.WriteData(node):
            raise LiverSegError(f"{path}: could not be written")

    atomic_write(path, write, overwrite)


def export_labelmap(ctx: SceneContext, segmentation, segment_id: str, volume):
    import vtk

    labelmap = ctx.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "liver labelmap")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, volume)
    return labelmap


def labelmap_ml(labelmap) -> float:
    from vtk.util.numpy_support import vtk_to_numpy

    from LiverSegExtension.metrics import volume_ml

    return volume_ml(vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()), labelmap.GetSpacing())


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 1, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"LiverSegBatch: error: --shard must look like I/N (e.g. 1/4), got {text!r}") from None
    if not (1 <= i <= n):
        raise SystemExit(f"LiverSegBatch: error: --shard I/N needs 1 <= I <= N, got {text!r}")
    return i, n


def run(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="LiverSegBatch", description="Batch liver segmentation with LiverSeg.")
    p.add_argument("--input", "-i", nargs="+", required=True, help="volume files, DICOM folders, folders to search")
    p.add_argument("--output-dir", "-o", required=True, type=Path)
    p.add_argument("--labelmap", action="store_true", help="also write a .nii.gz labelmap on the input grid")
    p.add_argument("--skip-existing", action="store_true", help="skip cases whose outputs exist (resume a batch)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--shard", help="I/N: process cases I, I+N, I+2N... (1-based), for cluster job arrays")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    args = p.parse_args(argv)
    shard_i, shard_n = parse_shard(args.shard)

    from LiverSegLib.logic import LiverSegLogic
    from LiverSegLib.mrml import find_liver_segment, node_ids, remove_nodes_added_since

    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / ("summary.csv" if shard_n == 1 else f"summary_shard{shard_i}of{shard_n}.csv")
    cases = find_cases(args.input)[shard_i - 1 :: shard_n]
    logic = LiverSegLogic()
    try:
        logic.segmenter(args.model, args.device)
    except LiverSegError as exc:
        print(f"LiverSegBatch: error: {exc}", file=sys.stderr)
        return 2
    ctx = SceneContext()
    rows: list[dict] = []
    for n, case in enumerate(cases, 1):
        seg_path = out / f"{case.name}.seg.nrrd"
        lab_path = out / f"{case.name}_liver.nii.gz"
        row = summary_row(str(case.source), str(seg_path))
        start = time.perf_counter()
        wanted = [seg_path] + ([lab_path] if args.labelmap else [])
        before = node_ids(ctx.scene)
        # With --skip-existing no existing output is touched: an existing .seg.nrrd (perhaps corrected by
        # hand) is kept and a missing labelmap is made from it, not from a new run of the model.
        keep_seg = args.skip_existing and seg_path.exists()
        try:
            if args.skip_existing and all(w.exists() for w in wanted):
                row["status"] = "skipped"
            elif keep_seg:
                volume = ctx.load(case)
                segmentation = ctx.segmentations.LoadSegmentationFromFile(str(seg_path), False, case.name)
                if segmentation is None:
                    raise LiverSegError(f"{seg_path}: could not be read to make the missing labelmap")
                segment_id = find_liver_segment(segmentation)
                if segment_id is None:
                    raise LiverSegError(f"{seg_path}: has no segment named 'Liver' to make the labelmap from")
                labelmap = export_labelmap(ctx, segmentation, segment_id, volume)
                write_node(labelmap, lab_path, False)
                row["liver_ml"] = f"{labelmap_ml(labelmap):.1f}"
            else:
                volume = ctx.load(case)
                result = logic.process(volume, None, device=args.device, modelPath=args.model)
                write_node(result.segmentation_node, seg_path, args.overwrite)
                if args.labelmap and not (args.skip_existing and lab_path.exists()):
                    labelmap = export_labelmap(ctx, result.segmentation_node, result.segment_id, volume)
                    write_node(labelmap, lab_path, args.overwrite)
                row["liver_ml"] = f"{result.liver_ml:.1f}"
                row["warning"] = "; ".join(result.warnings)
        except LiverSegError as exc:
            row.update(status="failed", output="", error=str(exc))
        except Exception as exc:  # one bad case must not stop the batch
            logging.debug("case failed", exc_info=True)
            row.update(status="failed", output="", error=f"{case.source}: unexpected error: {exc}")
        finally:  # keep memory flat over long batches: every node the case added goes, color tables too
            remove_nodes_added_since(ctx.scene, before)
        row["seconds"] = f"{time.perf_counter() - start:.2f}"
        rows.append(row)
        write_summary(summary_path, rows)
        detail = row["error"] or (f"{row['liver_ml']} mL" if row["liver_ml"] else "")
        detail += f" WARNING: {row['warning']}" if row["warning"] else ""
        print(f"[{n}/{len(cases)}] {row['status']:7s} {case.source} {detail} ({row['seconds']} s)", flush=True)
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"LiverSegBatch: {len(rows) - failed} of {len(rows)} case(s) done, {failed} failed; summary in {summary_path}",
          flush=True)
    return 1 if failed else 0


def main() -> None:
    code = run(sys.argv[1:])
    if hasattr(slicer, "app") and hasattr(slicer.util, "exit") and not os.environ.get("LIVERSEG_NO_SLICER_EXIT"):
        slicer.util.exit(code)  # inside Slicer: quit the application with this status
    sys.exit(code)


if __name__ == "__main__":
    main()

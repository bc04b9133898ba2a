"""Headless batch segmentation with LiverSeg, through Slicer's own readers and writers.

Inside Slicer:   Slicer --no-main-window --python-script Scripts/LiverSegBatch.py -- --input PATH [PATH ...] --output-dir OUT
Plain Python:    python Scripts/LiverSegBatch.py --input PATH [PATH ...] --output-dir OUT     (pip install slicer-core)

It lives in Scripts/, not beside LiverSeg.py: Slicer loads every top-level .py of a scripted-modules
folder as a module at startup.

Inputs are volume files, DICOM folders (one case per series) and folders searched for both, found and
named as the CLI does. Each case gives OUT/<name>_liver.seg.nrrd (segment "Liver" with its terminology)
and, with --labelmap, OUT/<name>_liver.nii.gz (uint8) on the input file's own grid. OUT/summary.csv (or
summary_shardIofN.csv with --shard) gets one row per case, merged with the rows of earlier runs. A failed
case is recorded and the batch goes on. Exit code: 0, or 1 if any case failed, 2 for usage errors and for
what makes the whole run wrong (a model that cannot be loaded), 3 for an unexpected error (its traceback
printed), 130 when interrupted. Every way out ends Slicer with that code: ``Slicer --python-script`` does not
quit when the script ends.

In Slicer's process the networks run in ONNX Runtime on the CPU only; a GPU device, or "auto" where an
installed torch could reach a GPU, sends the cases through the LiverSeg engine process, as the panel does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

UNEXPECTED = 3  # the exit code of an error LiverSeg does not expect (a bug, a broken install)


def end(code: int) -> None:
    """Leave with ``code``. Inside Slicer, Slicer itself is told to end with it: after ``--python-script`` it
    keeps running (it quits by itself only after ``Slicer script.py``, ``-c`` and ``--testing``:
    qSlicerCoreCommandOptions.cxx, qSlicerCoreApplication.cxx), and a job-array task would hang until killed."""
    slicer_module = sys.modules.get("slicer")
    if hasattr(slicer_module, "app"):
        slicer_module.util.exit(code)  # Slicer's event loop ends with this status once the script returns
    sys.exit(code)


def unexpected() -> int:
    """Say what went wrong where LiverSeg did not expect it (the traceback), and the exit code for that."""
    traceback.print_exc()
    print("LiverSegBatch: unexpected error (see the traceback above)", file=sys.stderr, flush=True)
    return UNEXPECTED


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # LiverSegLib (and, from a checkout, the engine)

try:  # an import that fails (a broken install) must end Slicer too
    import LiverSegLib  # noqa: E402,F401 - makes the engine importable
    import slicer  # noqa: E402
    import vtk  # noqa: E402
    from LiverSegLib.dependencies import needs_torch  # noqa: E402
    from LiverSegLib.mrml import (  # noqa: E402
        find_liver_segment,
        node_ids,
        remove_nodes_added_since,
        segment_mask,
        volume_array_and_matrix,
    )

    from LiverSegExtension.batch import check_options, run_batch  # noqa: E402
    from LiverSegExtension.errors import LiverSegError, UsageError  # noqa: E402
    from LiverSegExtension.io import (  # noqa: E402
        InputCase,
        atomic_write,
        case_warnings,
        check_data_files_beside,
        check_file_length,
        check_loaded_grid,
        check_name_encoding,
        check_series_layout,
        input_grid,
        mask_path,
        quiet_native_logs,
        read_image,
        result_status,
        series_files_in_order,
        status_counts,
        write_mask,
    )
except Exception:
    if __name__ != "__main__":
        raise
    end(unexpected())


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

    def load(self, case: InputCase):
        """The case as a volume node, through Slicer's own readers."""
        archetype = Path(case.files[0]) if case.files else case.source
        for name in case.files or (case.source,):
            check_name_encoding(name)  # ITK would abort the process
        if not archetype.exists():
            raise LiverSegError(f"{case.label}: no such file or folder")
        if archetype.is_dir():
            read_image(archetype)  # raises with the engine's reason (nothing readable in the folder)
        if case.files:
            check_series_layout(case)  # Slicer's reader would stack a broken series on a wrong grid
        check_file_length(archetype)  # ITK would silently zero-fill a truncated file (NIfTI)
        if not case.files:
            check_data_files_beside(case.source)  # Slicer's reader would follow a header anywhere
            input_grid(case)  # the header alone: collinear directions refused with the engine's words
        if case.files:  # the series' own files, in slice order, as Slicer's DICOM plugin loads them
            files = series_files_in_order(case)
            file_list = vtk.vtkStringArray()
            for file in files:
                file_list.InsertNextValue(file)
            node = self.volumes.AddArchetypeScalarVolume(files[0], case.stem, 0, file_list)
        else:
            node = self.volumes.AddArchetypeVolume(str(archetype), case.stem, 0)
        if node is None or node.GetImageData() is None:
            if node is not None:
                self.scene.RemoveNode(node)
            if not case.files:
                read_image(case.source)  # raises with the engine's clear reason
            raise LiverSegError(f"{case.label}: Slicer could not read this volume")
        if case.files:
            array, matrix = volume_array_and_matrix(node)
            try:
                check_loaded_grid(case, matrix, array.shape)
            except LiverSegError:
                self.scene.RemoveNode(node)
                raise
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


def mask_on_file_grid(case: InputCase, segmentation, segment_id: str, volume):
    """The Liver segment as a uint8 ``[k, j, i]`` array on the input *file's* grid, as the CLI writes it
    (Slicer flips the K axis of left-handed volumes on load: the same places, another index order),
    and that grid."""
    import numpy as np
    import SimpleITK as sitk

    from LiverSegExtension.geometry import image_from_array

    mask = segment_mask(segmentation, segment_id, volume)
    on_node = image_from_array(mask, volume_array_and_matrix(volume)[1])
    grid = input_grid(case)  # the grid the engine reads, header and all
    # Nearest neighbour between two grids with the same voxel centres is an exact reordering.
    on_file = sitk.Resample(on_node, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(on_file)
    if int(array.sum()) != int(np.count_nonzero(mask)):
        raise LiverSegError(f"{case.label}: the volume Slicer loaded does not lie on the file's grid")
    return array, grid


class BatchDoor:
    """The batch's part of :func:`LiverSegExtension.batch.run_batch`: Slicer's readers, the module's logic
    (ONNX Runtime here; the engine process on a GPU), Slicer's writers, a line per case."""

    def __init__(self, args: argparse.Namespace, notes: list[str]) -> None:
        from LiverSegLib.logic import LiverSegLogic

        from LiverSegExtension.model.environment import torch_may_reach_gpu

        self.args, self.notes = args, notes
        self.logic = LiverSegLogic()
        # On a GPU the networks run in torch, which Slicer's process never imports: cases then go through the
        # engine process, as the panel's do; so does "auto" where an installed torch could reach a GPU (read
        # from its files, not imported). Otherwise they run here, in ONNX Runtime on the CPU.
        self.through_engine = needs_torch(args.device) or (
            str(args.device).lower() == "auto" and torch_may_reach_gpu())
        self.ctx: SceneContext | None = None

    def wanted(self, case: InputCase, name: str) -> list[Path]:
        out, args = self.args.output_dir, self.args
        return ([mask_path(out, name, "seg.nrrd")] + ([mask_path(out, name, "nii.gz")] if args.labelmap else [])
                + ([mask_path(out, name, "dicom-seg")] if args.dicom_seg and case.files else []))

    def prepare(self, planned) -> None:
        for note in self.notes:
            print(f"LiverSegBatch: {note}", flush=True)
        try:  # a model that cannot be loaded makes the whole run wrong: a usage error, as in the CLI
            if self.through_engine:  # checked as the engine will, without loading torch here
                from LiverSegExtension.model.catalog import default_model_dir, has_networks, read_card

                folder = Path(self.args.model) if self.args.model else default_model_dir()
                if folder is None or not folder.is_dir() or not has_networks(folder):
                    raise UsageError(f"{folder or 'no bundled model'}: model folder not found (or not a model folder)")
                read_card(folder)
                logging.info("LiverSegBatch: the networks run in the LiverSeg engine process (device %s)", self.args.device)
            else:
                runs_on = self.logic.segmenter(self.args.model, self.args.device).runs_on
                logging.info("LiverSegBatch: the networks run in this process, %s", runs_on)
        except LiverSegError as exc:
            raise UsageError(str(exc)) from None
        from LiverSegExtension.model.catalog import bundled_model_name

        self.model_name = bundled_model_name(self.args.model)
        self.ctx = SceneContext()

    def segment(self, case: InputCase, name: str, existing: list[Path], row: dict, written: list[Path]) -> str:
        ctx, args = self.ctx, self.args
        seg_path, lab_path, dcm_path = (mask_path(args.output_dir, name, f) for f in ("seg.nrrd", "nii.gz", "dicom-seg"))
        before = node_ids(ctx.scene)
        try:
            volume = ctx.load(case)
            if seg_path in existing:  # only a labelmap is missing: made from the kept (perhaps corrected) segmentation
                segmentation = ctx.segmentations.LoadSegmentationFromFile(str(seg_path), False, name)
                if segmentation is None:
                    raise LiverSegError(f"{seg_path}: could not be read to make the missing labelmap")
                segment_id = find_liver_segment(segmentation)
                if segment_id is None:
                    raise LiverSegError(f"{seg_path}: has no segment named 'Liver' to make the labelmap from")
                from LiverSegExtension.data.metrics import volume_ml

                array, grid = mask_on_file_grid(case, segmentation, segment_id, volume)
                write_mask(array, grid, lab_path, False, None if case.files else case.source)
                written.append(lab_path)
                row["liver_ml"] = f"{volume_ml(array, grid.GetSpacing()):.1f}"
                return ""
            result = self._segment(volume, case.label)
            write_node(result.segmentation_node, seg_path, args.overwrite)
            written.append(seg_path)
            make_labelmap = args.labelmap and lab_path not in existing
            make_seg = dcm_path in self.wanted(case, name) and dcm_path not in existing and result.liver_ml > 0
            if make_labelmap or make_seg:  # the segment on the file's grid, once for both
                array, grid = mask_on_file_grid(case, result.segmentation_node, result.segment_id, volume)
            if make_labelmap:
                write_mask(array, grid, lab_path, args.overwrite, None if case.files else case.source)
                written.append(lab_path)
            notes: list[str] = []
            if make_seg:
                from LiverSegExtension.io.dicom_seg import write_dicom_seg
                from LiverSegExtension.model.catalog import default_model_dir, read_card

                card = read_card(args.model or default_model_dir())
                notes = write_dicom_seg(array, case.files, dcm_path, str(card.get("name", "liverseg")),
                                        str(card.get("version", "")), args.overwrite)
                written.append(dcm_path)
            warnings = case_warnings(case, result.warnings)
            row.update(liver_ml=f"{result.liver_ml:.1f}", uncertainty=f"{result.uncertainty:.3f}",
                       warning="; ".join(warnings), status=result_status(result.liver_ml, warnings),
                       runtime=result.runtime, model=self.model_name)
            return "; ".join(notes)
        finally:  # keep memory flat over long batches: every node the case added goes, color tables too
            remove_nodes_added_since(ctx.scene, before)

    def _segment(self, volume, source: str):
        """Segment through the engine process or here; warnings name ``source``, as the CLI's do."""
        if self.through_engine:
            run = self.logic.start(volume, None, self.args.device, self.args.model, source)
            run.wait()
            return self.logic.finish(run)
        return self.logic.process(volume, None, device=self.args.device, modelPath=self.args.model, source=source)

    def report(self, index: int, total: int, case: InputCase, row: dict, note: str) -> None:
        detail = row["error"] or (f"{row['liver_ml']} mL" if row["liver_ml"] else note)
        detail += f" WARNING: {row['warning']}" if row["warning"] else ""
        print(f"[{index}/{total}] {row['status']:7s} {case.label} {detail} ({row['seconds']} s)", flush=True)


def run(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="LiverSegBatch", description="Batch liver segmentation with LiverSeg.")
    p.add_argument("--input", "-i", nargs="+", required=True, help="volume files, DICOM folders, folders to search")
    p.add_argument("--output-dir", "-o", required=True, type=Path)
    p.add_argument("--labelmap", action="store_true", help="also write <name>_liver.nii.gz (uint8) on the input grid")
    p.add_argument("--dicom-seg", action="store_true",
                   help="for DICOM series inputs, also write <name>_liver.dcm: a DICOM SEG in the source's study")
    p.add_argument("--skip-existing", action="store_true",
                   help="resume: skip, silently, cases whose outputs exist and are complete")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--shard", help="I/N: process cases I, I+N, I+2N... (1-based) of the sorted case list")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--debug", action="store_true", help="show ITK's, VTK's and Slicer's own log lines and tracebacks")
    args = p.parse_args(argv)
    try:
        shard = check_options(args.output_dir, args.overwrite, args.skip_existing, args.shard)
    except UsageError as exc:
        p.error(str(exc))  # exit 2, as every usage error
    quiet_native_logs(args.debug)
    logging.getLogger("highdicom").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    logging.basicConfig(format="%(message)s")  # plain Python: a handler on stderr (Slicer has one: slicerqt's)
    logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.ERROR)  # explicitly: basicConfig would not
    out: Path = args.output_dir
    notes: list[str] = []
    door = BatchDoor(args, notes)
    try:
        code, rows, summary = run_batch(args.input, out, door, shard, args.overwrite, args.skip_existing, notes)
    except LiverSegError as exc:  # a model that cannot be loaded (2), a summary that cannot be written (1)
        print(f"LiverSegBatch: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    finally:
        door.logic.shutdown()  # the engine process, if cases went through it
    print(f"LiverSegBatch: {len(rows)} case(s): {status_counts(rows)}; summary in {summary}", flush=True)
    return code


def main() -> None:
    """Run, then end (Slicer too) with the exit code, whatever happened."""
    try:
        code = run(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C: the cases done are in the summary; a rerun goes on from there
        print("LiverSegBatch: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # no interpreter teardown: VTK's and ITK's threads must not abort the exit
    except SystemExit as exc:  # argparse: a usage error (2), --help (0)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:
        code = unexpected()
    end(code)


if __name__ == "__main__":
    main()

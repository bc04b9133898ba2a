"""Each input decompressed once, each mask written and compressed once, the paste only where the answer can be
non-zero, memory judged from the header before a voxel is read, and a command that ends under a virtual-memory
limit too small to start: each checked on real files and real libraries."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT
from synthetic import make_affine, phantom

from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.geometry import Grid, image_from_array, index_box


def nifti_header(dims, bitpix=16, datatype=4, endian="<") -> bytes:
    header = bytearray(348)
    header[0:4] = struct.pack(endian + "i", 348)
    header[40:56] = struct.pack(endian + "8h", len(dims), *dims, *[1] * (7 - len(dims)))
    header[70:74] = struct.pack(endian + "2h", datatype, bitpix)
    header[76:108] = struct.pack(endian + "8f", 1, 2, 2, 2, 1, 1, 1, 1)
    header[108:120] = struct.pack(endian + "3f", 352, 1, 0)
    header[252:256] = struct.pack(endian + "2h", 1, 0)  # a qform, no sform
    header[344:348] = b"n+1\0"
    return bytes(header) + b"\0" * 4


def gzip_of(*pieces: bytes, trailer: tuple[int, int] | None = None) -> bytes:
    """One gzip member of ``pieces``; ``trailer`` forges its (CRC-32, length) fields."""
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31)
    data = b"".join(deflate.compress(p) for p in pieces) + deflate.flush()
    return data if trailer is None else data[:-8] + struct.pack("<II", *trailer)


def ct_image(spacing=(3.0, 3.0, 4.0)):
    m = make_affine(spacing, (24, 40, 48))
    return image_from_array(phantom((24, 40, 48), m)[0].astype(np.int16), m)


# -- one pass over a .nii.gz: ITK's read, checked against the gzip trailer -------------------------------------
def test_a_whole_nii_gz_is_decompressed_once(tmp_path, monkeypatch):
    from LiverSegExtension.io import read_image

    image = ct_image()
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path), True)
    read = []
    real = gzip.open

    class Counted:
        def __init__(self, *args, **kwargs) -> None:
            self.file = real(*args, **kwargs)

        def read(self, *args):
            data = self.file.read(*args)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.file.close()

    monkeypatch.setattr(gzip, "open", Counted)
    got = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(image))
    assert read == [352, 352]  # the header, and the bytes before the voxels: never the voxels themselves


def test_a_stream_shorter_than_the_header_says_is_refused_though_its_trailer_agrees(tmp_path):
    """The trailer forged to the header's length (mod 2**32) and the held data's CRC: only the stream's
    real length tells; the check that rides on ITK's read still refuses it."""
    from LiverSegExtension.io import read_image

    header = nifti_header([64, 64, 64])
    held = header + np.random.default_rng(0).integers(0, 255, 1000, np.uint8).tobytes()  # does not compress
    claimed = 352 + 64 * 64 * 64 * 2
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip_of(held, trailer=(zlib.crc32(held), claimed)))
    with pytest.raises(LiverSegError, match=rf"short.nii.gz: (truncated or damaged file \(header promises {claimed} "
                                            r"bytes, the compressed stream holds 1352\)|corrupt compressed data)"):
        read_image(path)


@pytest.mark.slow
def test_a_stream_longer_than_the_header_says_by_4_gib_is_refused(tmp_path):
    """A real gzip stream (its own CRC) holding 2**32 bytes more than the header claims: the trailer's length,
    mod 2**32, agrees with the header; ITK reads the claimed voxels and stops. The CRC of what it read is
    not the stream's."""
    from LiverSegExtension.io import read_image

    image = ct_image()
    voxels = sitk.GetArrayViewFromImage(image).tobytes()
    header = bytearray(nifti_header([48, 40, 24]))
    struct.pack_into("<8f", header, 76, 1, 3, 3, 4, 1, 1, 1, 1)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(bytes(header) + voxels) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 22)
    chunk = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)  # after a full flush: repeatable as is
    crc = zlib.crc32(voxels, zlib.crc32(bytes(header)))
    for _ in range(1024):
        crc = zlib.crc32(zeros, crc)
    length = len(header) + len(voxels) + (1 << 32)
    path = tmp_path / "wrapped.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + body + chunk * 1024 + deflate.flush()
                     + struct.pack("<II", crc, length % (1 << 32)))
    with gzip.open(path) as f:  # the stream is sound: gzip reads it whole (its first 20 MB here)
        assert f.read(len(header) + len(voxels) + (1 << 24))[: len(header)] == bytes(header)
    with pytest.raises(LiverSegError, match="wrapped.nii.gz: truncated or damaged file"):
        read_image(path)


def test_damage_inside_the_stream_is_refused(tmp_path):
    from LiverSegExtension.io import read_image

    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct_image(), str(path), True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(LiverSegError, match="ct.nii.gz: (corrupt compressed data|truncated)"):
        read_image(path)


def test_a_big_endian_nii_gz_reads_the_same_voxels(tmp_path):
    """ITK swaps the bytes as it reads: the check compares the stream as stored."""
    from LiverSegExtension.io import read_image

    image = ct_image()
    voxels = sitk.GetArrayViewFromImage(image)
    path = tmp_path / "big.nii.gz"
    path.write_bytes(gzip_of(nifti_header([48, 40, 24], endian=">"), voxels.astype(">i2").tobytes()))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), voxels)


# -- memory, from the header --------------------------------------------------------------------------------
def test_a_ct_too_large_for_this_machine_is_refused_from_its_header(tmp_path, monkeypatch):
    """The issue's case: 10 MB of .nii.gz claiming 4096x4096x320 is refused before ITK reads a voxel or the
    stream is decompressed, naming what it would need."""
    from LiverSegExtension.io import memory, read_image

    path = tmp_path / "big.nii.gz"
    path.write_bytes(gzip_of(nifti_header([4096, 4096, 320]), bytes(1 << 20)))
    monkeypatch.setattr(memory, "memory_bytes", lambda: 8 * 10**9)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", lambda self: pytest.fail("ITK read the voxels"))
    monkeypatch.setattr(gzip, "open", lambda *a, **k: pytest.fail("the stream was decompressed"))
    with pytest.raises(LiverSegError) as raised:
        read_image(path)
    assert str(raised.value) == (f"{path}: the header claims 10.7 GB of voxels (4096x4096x320): not enough memory "
                                 "(needed about 22 GB; this machine has 8.0 GB)")


def test_a_virtual_memory_limit_is_judged_too(monkeypatch):
    from LiverSegExtension.io import memory

    monkeypatch.setattr(memory, "address_space_left", lambda: 300 * 10**6)
    with pytest.raises(LiverSegError, match=r"ct: the header claims 0.3 GB of voxels \(512x512x516\): not enough "
                                            r"memory \(needed about 1 GB; the process's virtual-memory limit "
                                            r"\(ulimit -v\) leaves 0.3 GB\)"):
        memory.check_fits_memory("ct", (512, 512, 516))
    memory.check_fits_memory("ct", (512, 512, 16))  # 8 MB of voxels fit


def test_a_dicom_series_is_judged_before_it_is_read(tmp_path, monkeypatch):
    from synthetic import write_dicom_series

    from LiverSegExtension.io import expand_inputs, memory, read_case

    m = make_affine((4.0, 4.0, 5.0), (20, 32, 32))
    write_dicom_series(tmp_path / "series", phantom((20, 32, 32), m)[0], m)
    [case] = expand_inputs([tmp_path / "series"])
    monkeypatch.setattr(memory, "memory_bytes", lambda: 10**8)
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", lambda self: pytest.fail("ITK read the series"))
    with pytest.raises(LiverSegError, match=r"series: the header claims 0.0 GB of voxels \(32x32x20\): not enough "
                                            r"memory \(needed about 1 GB; this machine has 0.1 GB\)"):
        read_case(case)


def test_libraries_that_cannot_be_mapped_are_memory():
    from LiverSegExtension.io import is_allocation_failure

    assert is_allocation_failure(ImportError("libscipy_openblas.so: failed to map segment from shared object"))
    assert not is_allocation_failure(ImportError("No module named 'torch'"))


@pytest.mark.process
def test_a_virtual_memory_limit_too_small_to_start_is_one_line_not_a_hang():
    """Under ``ulimit -v`` of 500 MB, numpy's OpenBLAS used to hang in its thread start: the command now says so
    before it imports anything."""
    import resource

    code = "import sys; import LiverSegExtension; sys.exit(LiverSegExtension.console())"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (500 << 20, 500 << 20))

    r = subprocess.run([sys.executable, "-c", code, "segment", "ct.nii.gz", "-o", "out"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60, preexec_fn=limit)
    assert r.returncode == 1 and r.stderr.strip() == "liverseg: error: not enough memory to start"


@pytest.mark.process
def test_openblas_runs_one_thread_for_every_command_but_train():
    code = ("import os, sys; import LiverSegExtension, LiverSegExtension.cli as c; c.main = lambda: 0; "
            "LiverSegExtension.console(); print(os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {"OPENBLAS_NUM_THREADS": "8", "PATH": "/usr/bin:/bin"}
    got = {cmd: subprocess.run([sys.executable, "-c", code, cmd], capture_output=True, text=True, cwd=ROOT,
                               env=env, timeout=60).stdout.strip() for cmd in ("segment", "train")}
    assert got == {"segment": "1", "train": "8"}


# -- masks written once, with the input's header ------------------------------------------------------------
def test_a_nifti_mask_carries_the_inputs_header_and_is_compressed_once(tmp_path, monkeypatch):
    from LiverSegExtension.io import read_image, write_mask

    image = ct_image()
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(source), True)
    data = bytearray(gzip.decompress(source.read_bytes()))
    struct.pack_into("<2h", data, 252, 2, 4)  # aligned-anatomy qform, an MNI sform: ITK would write its own
    struct.pack_into("<12f", data, 280, -3, 0, 0, 10, 0, -3, 0, 20, 0, 0, 4, 30)
    source.write_bytes(gzip.compress(bytes(data)))
    image = read_image(source)
    mask = (sitk.GetArrayViewFromImage(image) > 100).astype(np.uint8)
    monkeypatch.setattr(sitk, "WriteImage", lambda *a, **k: pytest.fail("ITK wrote it (and it was rewritten)"))
    write_mask(mask, image, tmp_path / "ct_liver.nii.gz", header_source=source)
    out = gzip.decompress((tmp_path / "ct_liver.nii.gz").read_bytes())
    assert out[252:328] == bytes(data[252:328]) and out[76:92] == bytes(data[76:92])
    assert struct.unpack("<2h", out[70:74]) == (2, 8) and out[352:] == mask.tobytes()
    monkeypatch.undo()
    back = sitk.ReadImage(str(tmp_path / "ct_liver.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), mask)
    assert back.GetOrigin() == image.GetOrigin() and back.GetDirection() == image.GetDirection()


def test_a_mask_in_metres_keeps_its_unit(tmp_path):
    """ITK reads a NIfTI's sizes in metres as such: the mask says metres too, or it would lie 1000 times smaller."""
    from LiverSegExtension.io.formats.nifti import mask_header

    header = bytearray(nifti_header([8, 8, 8]))
    header[123] = 1 | 8
    (tmp_path / "m.nii").write_bytes(bytes(header) + bytes(8 * 8 * 8 * 2))
    assert mask_header(tmp_path / "m.nii", (8, 8, 8))[123] == 1 | 8
    assert mask_header(tmp_path / "m.nii", (8, 8, 9)) is None  # another grid: ITK writes that mask


@pytest.mark.process
def test_a_mask_cut_short_by_a_file_size_limit_never_takes_its_name(tmp_path):
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np, SimpleITK as sitk
from LiverSegExtension.errors import LiverSegError
from LiverSegExtension.io import write_mask
reference = sitk.Image([120, 120, 120], sitk.sitkInt16)
sitk.WriteImage(reference, {str(tmp_path / 'ct.nii.gz')!r})
mask = (np.random.default_rng(0).random((120, 120, 120)) > 0.5).astype(np.uint8)  # does not compress
resource.setrlimit(resource.RLIMIT_FSIZE, (40960, 40960))
try:
    write_mask(mask, reference, {str(tmp_path / 'ct_liver.nii.gz')!r}, header_source={str(tmp_path / 'ct.nii.gz')!r})
except LiverSegError as exc:
    print(exc)
    sys.exit(1)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "ct_liver.nii.gz: could not be written" in r.stdout and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]  # neither the mask nor a temporary


# -- the paste: only the box the probabilities can reach -----------------------------------------------------
def paste_everywhere(image, grid, prob, mask, probability):
    """The paste as it was: the whole fine grid's box resampled onto the input grid."""
    prob_image = sitk.GetImageFromArray(prob.astype(np.float32))
    prob_image.SetOrigin(grid.origin)
    prob_image.SetSpacing(grid.spacing)
    lo, hi = index_box(image, np.asarray(grid.origin), grid.index_to_physical(np.array(grid.size) - 1), margin_vox=1)
    ref = sitk.Image([int(v) for v in hi - lo], sitk.sitkUInt8)
    ref.SetSpacing(image.GetSpacing())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    sub = sitk.Resample(prob_image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    block = sitk.GetArrayFromImage(sitk.BinaryThreshold(sub, 0.5, 2.0, 1, 0))
    mask[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = block
    p = np.rint(np.clip(sitk.GetArrayViewFromImage(sub), 0.0, 1.0) * 255.0).astype(np.uint8)
    p[(block > 0) & (p < 128)] = 128
    p[(block == 0) & (p >= 128)] = 127
    probability[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = p


@pytest.mark.parametrize("rot, edge", [((0, 0, 0), False), ((0.2, -0.1, 0.35), False), ((0, 0, 0), True)])
def test_the_paste_of_the_box_alone_gives_the_whole_grids_answer(rot, edge):
    """Smooth probabilities (a cleaned liver's: zero away from it) on a fine grid inside an oblique or axis-aligned
    input grid, and ones that reach the fine grid's edge: mask and probability map equal, voxel for voxel."""
    from synthetic import rotation

    from LiverSegExtension.inference.segmenter import LiverSegmenter

    image = sitk.Image([90, 80, 40], sitk.sitkInt16)
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetOrigin((-30.0, -25.0, -45.0))
    image.SetDirection(rotation(*rot)[:3, :3].ravel().tolist())
    grid = Grid.covering(np.array([-12.0, -10.0, -20.0]), np.array([18.0, 16.0, 22.0]), 1.5)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in grid.size[::-1]), indexing="ij")
    centre = np.array(grid.size[::-1]) / 2 + (np.array(grid.size[::-1]) / 2 if edge else 0)
    r = np.sqrt(((z - centre[0]) / 8) ** 2 + ((y - centre[1]) / 6) ** 2 + ((x - centre[2]) / 7) ** 2)
    prob = np.clip(1.5 - r, 0, 1).astype(np.float32)
    prob[prob < 0.05] = 0
    got = np.zeros(image.GetSize()[::-1], np.uint8), np.zeros(image.GetSize()[::-1], np.uint8)
    want = np.zeros_like(got[0]), np.zeros_like(got[1])
    LiverSegmenter._paste(LiverSegmenter.__new__(LiverSegmenter), image, grid, prob, *got)
    paste_everywhere(image, grid, prob, *want)
    assert want[0].sum() > 300 and 0 < (want[1] > 0).sum() < want[1].size
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_nothing_to_paste_leaves_zeros():
    from LiverSegExtension.inference.segmenter import LiverSegmenter

    image = sitk.Image([20, 20, 20], sitk.sitkInt16)
    grid = Grid.covering(np.zeros(3), np.full(3, 10.0), 1.5)
    mask = np.zeros((20, 20, 20), np.uint8)
    LiverSegmenter._paste(LiverSegmenter.__new__(LiverSegmenter), image, grid, np.zeros(grid.size[::-1], np.float32), mask, None)
    assert not mask.any()


def test_the_networks_allocation_failure_is_not_enough_memory(threshold_segmenter, monkeypatch):
    """ONNX Runtime's error type is its own, not a RuntimeError: its words decide."""
    class Fail(Exception):
        pass

    def predict(stage, volume):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : bfc_arena.cc:360 Failed to allocate memory for requested buffer")

    monkeypatch.setattr(threshold_segmenter, "predict", predict)
    with pytest.raises(LiverSegError, match=r"ct: not enough memory \(needed about 1 GB\)"):
        threshold_segmenter.segment_image(ct_image((8.0, 8.0, 8.0)), source="ct")  # air around the body


@pytest.mark.process
def test_reading_runs_no_scipy_and_segmenting_waits_for_its_import(tmp_path):
    """scipy.ndimage (a quarter of a second of the start) is not imported by reading or writing; a segmenter
    imports it in a thread of its own, and its first use finds it there."""
    code = ("import sys; from LiverSegExtension.io import read_image, write_mask; "
            "assert 'scipy' not in sys.modules, 'io'; "
            "from LiverSegExtension.inference import segmenter; assert 'scipy.ndimage' not in sys.modules, 'import'; "
            "segmenter.prefetch_ndimage(); from scipy import ndimage; print(ndimage.label.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "label", r.stderr


"""Binary masks as compact text, for node attributes saved with a Slicer scene (the model's draft, the
uncertain band): computed in the engine process, so Slicer's main thread only stores the text."""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np

from LiverSegExtension.data.metrics import UNSURE


def encode_mask(mask: np.ndarray) -> str:
    """A binary mask as compact text for a node attribute (saved with the scene): its box, bit-packed,
    zlib-compressed, base64. A liver on a 512x512x200 grid takes tens of kilobytes."""
    shape = [int(n) for n in mask.shape]
    lo, hi = [0, 0, 0], [0, 0, 0]
    for axis in range(3):  # the box from per-axis projections: cheaper than listing every voxel
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if len(hit):
            lo[axis], hi[axis] = int(hit[0]), int(hit[-1]) + 1
    box = np.asarray(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=bool)
    payload = base64.b64encode(zlib.compress(np.packbits(box).tobytes(), 6)).decode("ascii")
    return json.dumps({"v": 1, "shape": shape, "lo": lo, "hi": hi}, separators=(",", ":")) + "|" + payload


def decode_mask(text: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The mask ``encode_mask`` wrote, or None when there is none, it is damaged, or the grid changed."""
    if not text or "|" not in text:
        return None
    try:
        head, payload = text.split("|", 1)
        meta = json.loads(head)
        if meta.get("v") != 1 or tuple(meta["shape"]) != tuple(shape):
            return None
        lo, hi = meta["lo"], meta["hi"]
        size = [b - a for a, b in zip(lo, hi)]
        bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(payload)), dtype=np.uint8))
        mask = np.zeros(shape, dtype=np.uint8)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = bits[: int(np.prod(size))].reshape(size)
        return mask
    except (ValueError, KeyError, TypeError, zlib.error):
        return None


def uncertain_band(probability: np.ndarray) -> np.ndarray:
    """Where a uint8 (255 x p) liver probability lies between the band's limits (metrics.UNSURE)."""
    return ((probability > UNSURE[0] * 255) & (probability < UNSURE[1] * 255)).astype(np.uint8)

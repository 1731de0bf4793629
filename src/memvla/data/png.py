"""A small, fast PNG codec for the 8-bit images stored in LeRobot datasets.

``encode_png`` writes a standard PNG (8-bit grey, RGB or RGBA, no interlace, every row
with filter type 0 "None", zlib level 1 by default). For the small flat-coloured frames
of the built-in tasks this is several times faster than Pillow, whose fixed overhead per
image dominates at 64x64, and the files are only slightly larger.

``decode_png`` decodes such files directly with zlib and numpy, and falls back to Pillow
for any other PNG (adaptive filters, palettes, 16 bits, interlace: what Pillow and so
LeRobot itself write). Pillow is only imported for that fallback.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type for a channel count (grey, -, RGB, RGBA) and back
_COLOR_TYPE = {1: 0, 3: 2, 4: 6}
_CHANNELS = {0: 1, 2: 3, 6: 4}


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(tag))
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """Encode a uint8 image of shape (H, W, C) with C in {1, 3, 4}, or (H, W), as PNG bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png needs a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in _COLOR_TYPE:
        raise ValueError(f"encode_png needs an (H, W, C) image, C in 1, 3, 4; got {image.shape}")
    h, w, c = image.shape
    raw = np.zeros((h, 1 + w * c), dtype=np.uint8)  # (H, 1 + W*C): filter byte 0, then the row
    raw[:, 1:] = image.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return b"".join(
        (
            _SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(raw.data, level)),
            _chunk(b"IEND", b""),
        )
    )


def _decode_fast(data: bytes) -> np.ndarray | None:
    """Decode an 8-bit, non-interlaced PNG whose rows all use filter 0; else return None."""
    if not data.startswith(_SIGNATURE):
        return None
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
        elif tag == b"PLTE" or tag == b"tRNS":
            return None  # palette or transparency: leave it to Pillow
    if header is None or not idat:
        return None
    w, h, depth, color, _, _, interlace = header
    if depth != 8 or interlace != 0 or color not in _CHANNELS:
        return None
    c = _CHANNELS[color]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    if raw.size != h * (1 + w * c):
        return None
    raw = raw.reshape(h, 1 + w * c)
    if raw[:, 0].any():
        return None  # some rows use a prediction filter
    return raw[:, 1:].reshape(h, w, c)  # (H, W, C) read-only view


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a uint8 array of shape (H, W, C).

    Grey images come back with C = 1. Any image that Pillow reads is accepted (Pillow is
    needed only for PNGs that the fast path does not handle).
    """
    image = _decode_fast(data)
    if image is not None:
        return image
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding this image needs Pillow (pip install pillow, or memvla[sim])"
        ) from e
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGB")
        array = np.asarray(im)
    return array[:, :, None] if array.ndim == 2 else array  # (H, W, C)

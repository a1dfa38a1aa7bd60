"""Reader for the IDX format of the MNIST-style distribution files.

An IDX file is a big-endian header followed by a raw payload. The header is a 4-byte magic
number ``0x00 0x00 <type> <ndim>`` and then ``ndim`` unsigned 32-bit sizes. MNIST and
Fashion-MNIST use type ``0x08`` (unsigned byte): images have magic 2051 (``0x00000803``, three
sizes: count, rows, cols) and labels magic 2049 (``0x00000801``, one size: count).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib

import numpy as np

from ._errors import DataCorruptError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_UBYTE = 0x08
_FIX = "delete the file and download it again"


def gunzip(data: bytes, source: str = "<bytes>") -> bytes:
    """Decompress a gzip stream, raising :class:`DataCorruptError` if it is broken."""
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataCorruptError(f"{source}: not a valid gzip stream ({exc}); {_FIX}") from None


def parse_idx(data: bytes, *, expected_magic: int | None = None, source: str = "<bytes>") -> np.ndarray:
    """Parse an unsigned-byte IDX payload into a read-only ``uint8`` array of the header's shape.

    The payload length must equal the product of the sizes in the header exactly.
    """
    if len(data) < 4:
        raise DataCorruptError(f"{source}: {len(data)} bytes is too short for an IDX header; {_FIX}")
    (magic,) = struct.unpack(">I", data[:4])
    if expected_magic is not None and magic != expected_magic:
        raise DataCorruptError(
            f"{source}: bad IDX magic number {magic} (0x{magic:08x}), expected {expected_magic} "
            f"(0x{expected_magic:08x}); wrong file or {_FIX}"
        )
    if data[0] != 0 or data[1] != 0 or data[3] == 0:
        raise DataCorruptError(f"{source}: bad IDX magic number {magic} (0x{magic:08x}); wrong file or {_FIX}")
    if data[2] != _UBYTE:
        raise DataCorruptError(
            f"{source}: IDX element type 0x{data[2]:02x} is not supported (only unsigned bytes, 0x08); "
            "use the standard distribution files"
        )
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataCorruptError(
            f"{source}: IDX header truncated ({len(data)} bytes, need {header_len} for {ndim} sizes); {_FIX}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = math.prod(dims)
    payload = len(data) - header_len
    if payload != expected:
        what = "too short" if payload < expected else "too long"
        raise DataCorruptError(
            f"{source}: IDX payload {what}: {payload} bytes, but the header sizes {tuple(dims)} need "
            f"{expected}; {_FIX}"
        )
    arr = np.frombuffer(data, dtype=np.uint8, count=expected, offset=header_len).reshape(dims)
    arr.flags.writeable = False
    return arr


def read_idx_images(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX image payload (magic 2051) into a read-only ``(N, rows, cols)`` uint8 array."""
    arr = parse_idx(data, expected_magic=IMAGES_MAGIC, source=source)
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataCorruptError(f"{source}: IDX images have an empty size {arr.shape[1:]}; {_FIX}")
    return arr


def read_idx_labels(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX label payload (magic 2049) into a read-only ``(N,)`` uint8 array."""
    return parse_idx(data, expected_magic=LABELS_MAGIC, source=source)


def check_pair(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    source: str = "<bytes>",
    image_shape: tuple[int, int] | None = None,
    n_classes: int | None = None,
) -> None:
    """Check that an image array and a label array belong together.

    The counts must match; optionally the image size must be ``image_shape`` and every label
    must lie in ``0 .. n_classes - 1``.
    """
    if images.shape[0] != labels.shape[0]:
        raise DataCorruptError(
            f"{source}: {images.shape[0]} images but {labels.shape[0]} labels; the files do not belong "
            f"together, {_FIX}"
        )
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise DataCorruptError(
            f"{source}: images are {images.shape[1]}x{images.shape[2]}, expected "
            f"{image_shape[0]}x{image_shape[1]}; wrong file or {_FIX}"
        )
    if n_classes is not None and labels.size and int(labels.max()) >= n_classes:
        raise DataCorruptError(
            f"{source}: label {int(labels.max())} is out of range 0..{n_classes - 1}; wrong file or {_FIX}"
        )

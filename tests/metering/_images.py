"""Test images built in code: small files whose pixel size is what a provider bills."""

from __future__ import annotations

import math
import struct
import zlib


def solid_png(width: int, height: int) -> bytes:
    """A one-colour, 1-bit greyscale PNG: a few hundred bytes whatever its size in pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x00" * (1 + math.ceil(width / 8))) * height
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")

"""Vector encodings: base64 float32 on the wire (JSON-safe, compact), BSON Binary float32 at rest."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from bson.binary import Binary, BinaryVectorDtype

# A BSON vector (Binary subtype 9) starts with a dtype byte and a padding byte.
_FLOAT32_DTYPE_BYTE = BinaryVectorDtype.FLOAT32.value[0]
_VECTOR_HEADER_BYTES = 2


def to_wire(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def from_wire(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def to_bson(vector: np.ndarray) -> Binary:
    return Binary.from_vector(np.asarray(vector, dtype=np.float32).tolist(), BinaryVectorDtype.FLOAT32)


def from_stored(value: Any) -> np.ndarray:
    """An embedding as MongoDB returns it: ``Binary`` subtype 9; raw bytes, header included, from nx-27017, which
    drops the subtype (``_strip_vector_header``); or a float array (older documents)."""
    if isinstance(value, Binary) and value.subtype == 9:
        return np.asarray(value.as_vector().data, dtype=np.float32)
    if isinstance(value, bytes | bytearray | memoryview):
        return _strip_vector_header(bytes(value))
    if isinstance(value, list | tuple):
        return np.asarray(value, dtype=np.float32)
    raise TypeError(f"cannot decode an embedding stored as {type(value).__name__}")


def _strip_vector_header(raw: bytes) -> np.ndarray:
    if len(raw) % 4 == _VECTOR_HEADER_BYTES and raw[0] == _FLOAT32_DTYPE_BYTE:
        return np.frombuffer(raw, dtype="<f4", offset=_VECTOR_HEADER_BYTES)
    if len(raw) % 4 == 0:
        return np.frombuffer(raw, dtype="<f4")
    raise ValueError(f"stored embedding of {len(raw)} bytes is not a float32 vector")


def normalise(matrix: np.ndarray) -> np.ndarray:
    """Unit rows in float32 (a zero row stays zero); the norm in float64, whose squares of float32 values neither
    underflow nor overflow."""
    wide = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(wide, axis=-1, keepdims=True)
    norms[norms == 0] = 1.0
    return (wide / norms).astype(np.float32)

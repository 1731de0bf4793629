"""The wire format of the policy server: msgpack with numpy arrays, as openpi encodes them.

openpi's ``openpi_client.msgpack_numpy`` (what robot code talking to an openpi server
uses) sends a numpy array as a msgpack map ``{b"__ndarray__": True, b"data": <raw bytes,
C order>, b"dtype": <dtype.str, e.g. "<f4">, b"shape": [...]}`` and a numpy scalar as
``{b"__npgeneric__": True, b"data": <python value>, b"dtype": <dtype.str>}``; everything
else is plain msgpack. This module reads and writes exactly that, so that openpi's client
and server interoperate with memvla's, and it is written for a server that faces a
network:

- nothing is ever unpickled: only the dtypes of plain numbers, booleans and fixed-width
  strings are accepted (object, void / structured, complex, datetime dtypes are refused,
  on both sides), and msgpack extension types are refused;
- an array's byte count must equal ``prod(shape) * itemsize`` exactly (openpi's decoder
  accepts a longer buffer; a mismatch here is an error naming the sizes);
- decoded arrays are writable copies that do not alias the received message.

Errors are :class:`ProtocolError` (a ``ValueError``) naming what was expected and received.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

NDARRAY = b"__ndarray__"
NPGENERIC = b"__npgeneric__"
# numpy kinds that carry plain values: bool, signed, unsigned, float, bytes, unicode
ALLOWED_KINDS = frozenset("biufSU")
MAX_DIMS = 32


class ProtocolError(ValueError):
    """A message that is not valid msgpack-with-numpy (or would need unpickling)."""


def _checked_dtype(text: Any) -> np.dtype:
    """The dtype named by ``text`` (e.g. ``"<f4"``) if it is a plain numeric/string one."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not isinstance(text, str):
        raise ProtocolError(f"array dtype: expected a dtype string such as '<f4', got "
                            f"{type(text).__name__}")
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"array dtype: expected a numpy dtype string such as '<f4', got "
                            f"{text!r}") from e
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype:
        raise ProtocolError(f"array dtype: expected a bool, integer, float or string dtype, got "
                            f"{text!r} (kind {dtype.kind!r}; object and structured dtypes are "
                            "refused: they could need unpickling)")
    return dtype


def _encode(obj: Any) -> Any:
    """msgpack's ``default`` hook: numpy arrays / scalars (and torch tensors) -> maps."""
    if type(obj).__module__.startswith("torch") and hasattr(obj, "numpy"):
        obj = obj.detach().cpu().numpy()  # a convenience: tensors travel as arrays
    if isinstance(obj, np.ndarray | np.generic) and (
            obj.dtype.kind not in ALLOWED_KINDS or obj.dtype.fields is not None):
        raise ProtocolError(f"cannot send an array of dtype {obj.dtype} (kind "
                                f"{obj.dtype.kind!r}): only bool, integer, float and string "
                                "dtypes travel")
    if isinstance(obj, np.ndarray):
        return {NDARRAY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {NPGENERIC: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise ProtocolError(f"cannot send a value of type {type(obj).__name__}: expected msgpack "
                        "types (dict, list, str, bytes, numbers, None) and numpy arrays")


def _decode_array(obj: dict) -> np.ndarray:
    for key in (b"data", b"dtype", b"shape"):
        if key not in obj:
            raise ProtocolError(f"array: missing field {key.decode()!r}; an array is a map "
                                "with __ndarray__, data, dtype and shape")
    data, shape = obj[b"data"], obj[b"shape"]
    dtype = _checked_dtype(obj[b"dtype"])
    if not isinstance(data, bytes):
        raise ProtocolError(f"array data: expected bytes, got {type(data).__name__}")
    if (not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                       for s in shape)):
        raise ProtocolError(f"array shape: expected a list of at most {MAX_DIMS} "
                            f"non-negative integers, got {shape!r}")
    need = math.prod(shape) * dtype.itemsize
    if need != len(data):
        raise ProtocolError(f"array of shape {list(shape)} and dtype {dtype.str}: expected "
                            f"{need} bytes of data, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, not aliased


def _decode_scalar(obj: dict) -> np.generic:
    for key in (b"data", b"dtype"):
        if key not in obj:
            raise ProtocolError(f"numpy scalar: missing field {key.decode()!r}")
    dtype, value = _checked_dtype(obj[b"dtype"]), obj[b"data"]
    if not isinstance(value, bool | int | float | str | bytes):
        raise ProtocolError(f"numpy scalar data: expected a number, bool or string, got "
                            f"{type(value).__name__}")
    try:
        return dtype.type(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"numpy scalar: {value!r} is not a valid {dtype.str}") from e


def _object_hook(obj: dict) -> Any:
    if obj.get(NDARRAY) is True:
        return _decode_array(obj)
    if obj.get(NPGENERIC) is True:
        return _decode_scalar(obj)
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not accepted")


def packb(obj: Any) -> bytes:
    """``obj`` (msgpack types, numpy arrays and scalars) as bytes in openpi's encoding."""
    try:
        return msgpack.packb(obj, default=_encode, use_bin_type=True)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode the message: {e}") from e


def unpackb(data: bytes, max_bytes: int | None = None) -> Any:
    """The message ``data`` decoded; numpy arrays come back as writable arrays. Refuses
    messages over ``max_bytes``, invalid msgpack, trailing bytes, extension types and
    arrays that are not plain numbers or strings."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"message: expected a binary msgpack frame, got "
                            f"{type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(f"message: {len(data)} bytes, over the limit of {max_bytes} bytes")
    try:
        return msgpack.unpackb(data, object_hook=_object_hook, ext_hook=_refuse_ext, raw=False)
    except ProtocolError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as e:
        raise ProtocolError(f"message: not valid msgpack ({type(e).__name__}: {e})") from e

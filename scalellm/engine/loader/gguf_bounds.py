"""A bounds walk over a GGUF header, run before the `gguf` package's reader sees the file.

The reader slices its memory map without checking the end, and a slice past the end is silently
empty: an array claiming 2**40 items of a scalar type is then read as 2**40 empty items, which takes
minutes and grows without bound. The walk below only skips over the header (key/value pairs and the
tensor index), checking every count and length against the bytes that remain, so a claim the file
cannot hold is a ModelLoadError before anything is built. It interprets no value.

    magic "GGUF", version u32, tensor_count u64, kv_count u64
    kv:      key (string), value_type u32, value
    value:   a scalar (sizes below), a string (u64 length + bytes), or an array
             (item_type u32, count u64, count values of item_type)
    tensor:  name (string), n_dims u32, n_dims x u64, type u32, offset u64
"""

from __future__ import annotations

import mmap
import struct

from scalellm.engine.loader.model_config import ModelLoadError

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF value type -> bytes: uint8, int8, uint16, int16, uint32, int32, float32, bool, uint64, int64, float64."""
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_MAX_DEPTH = 3
"""Arrays of arrays are allowed this deep."""


class _Cursor:
    """An offset into the file's bytes that never moves past their end."""

    def __init__(self, data, path: str) -> None:
        self.data, self.path, self.offset = data, path, 0

    def take(self, size: int, what: str) -> int:
        """Skip `size` bytes; the offset they start at."""
        if size < 0 or size > len(self.data) - self.offset:
            raise ModelLoadError(f"{self.path}: {what} at byte {self.offset} claims {size} bytes, "
                                 f"more than the file's remaining {len(self.data) - self.offset}")
        start, self.offset = self.offset, self.offset + size
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.data, self.take(8, what))[0]

    def string(self, what: str) -> None:
        self.take(self.u64(what), what)


def check_gguf_bounds(path: str) -> None:
    """Raise ModelLoadError if any count or length in the header of the GGUF file reaches past its end."""
    with open(path, "rb") as file:
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ModelLoadError(f"{path} is empty, not a GGUF file") from None
    with data:
        cursor = _Cursor(data, path)
        if bytes(data[:4]) != b"GGUF":
            return  # the reader names a wrong magic (or another byte order) itself
        cursor.take(8, "the header")
        num_tensors, num_fields = cursor.u64("the tensor count"), cursor.u64("the metadata count")
        for _ in range(num_fields):
            cursor.string("a metadata key")
            _skip_value(cursor, cursor.u32("a metadata type"), depth=0)
        for _ in range(num_tensors):
            cursor.string("a tensor name")
            dims = cursor.u32("a tensor's dimension count")
            if dims > _MAX_DIMS:
                raise ModelLoadError(f"{path}: a tensor claims {dims} dimensions")
            cursor.take(8 * dims + 4 + 8, "a tensor's shape, type and offset")


def _skip_value(cursor: _Cursor, value_type: int, depth: int) -> None:
    if value_type in _SCALAR_SIZES:
        cursor.take(_SCALAR_SIZES[value_type], "a metadata value")
    elif value_type == _STRING:
        cursor.string("a metadata string")
    elif value_type == _ARRAY and depth < _MAX_DEPTH:
        item_type, count = cursor.u32("an array's item type"), cursor.u64("an array's length")
        if item_type in _SCALAR_SIZES:
            cursor.take(count * _SCALAR_SIZES[item_type], "an array")
            return
        if count > (len(cursor.data) - cursor.offset) // 8:  # every string or array item takes >= 8 bytes
            raise ModelLoadError(f"{cursor.path}: an array at byte {cursor.offset} claims {count} items, "
                                 "more than the file can hold")
        for _ in range(count):
            _skip_value(cursor, item_type, depth + 1)
    else:
        raise ModelLoadError(f"{cursor.path}: unknown metadata type {value_type} (or arrays nested too deep) "
                             f"before byte {cursor.offset}")

"""A GGUF file's header read in one bounds-checked walk: its metadata as Python values and its tensor
table as views of the file's bytes.

    magic "GGUF", version u32 (2 or 3), tensor_count u64, kv_count u64
    kv:      key (string), value_type u32, value
    value:   a scalar (sizes below), a string (u64 length + UTF-8 bytes), or an array
             (item_type u32, count u64, count values of item_type)
    tensor:  name (string), n_dims u32, n_dims x u64 (innermost first), type u32, offset u64
    data:    from the first multiple of general.alignment (default 32) after the table; each
             tensor at data + offset

Every count and length is checked against the bytes that remain before it is used, so a claim the
file cannot hold is a ModelLoadError before anything is built (the `gguf` package's reader slices
its memory map without checking the end: an array claiming 2**40 items is read as 2**40 empty ones,
which takes minutes). It also makes a Python object per array item and per value, which for a
151k-entry vocabulary took seconds per load: here an array of numbers is one `frombuffer`, and the
tensors are views of the one memory map the header is read from (it stays open while they live).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

from scalellm.engine.loader.model_config import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF value type -> struct format: uint8, int8, uint16, int16, uint32, int32, float32, bool, uint64,
int64, float64."""
_U32, _STRING, _ARRAY, _U64 = 4, 8, 9, 10
_VERSIONS = (2, 3)
_MAX_DIMS = 8
_MAX_DEPTH = 3
"""Arrays of arrays are allowed this deep."""
_DEFAULT_ALIGNMENT = 32
_PLAIN_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}
"""Tensor types whose data is an array of the type itself; the others are bytes, one row of blocks a row."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the innermost (row) dimension first
    n_elements: int
    n_bytes: int
    data: np.ndarray  # a read-only view of the file: shaped like numpy (rows last), bytes per row for block types


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict[str, object]  # key -> int, float, bool, str, or a list of them
    tensors: list[GGUFTensorInfo]


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

    def scalar(self, value_type: int, what: str):
        fmt = _SCALARS[value_type]
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        size = self.scalar(_U64, what)
        start = self.take(size, what)
        try:
            return bytes(self.data[start:start + size]).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self.path}: {what} at byte {start} is not UTF-8") from None


def read_gguf_header(path: str) -> GGUFHeader:
    """The metadata and tensor table of the GGUF file at `path`; a ModelLoadError if it is not one."""
    with open(path, "rb") as file:
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ModelLoadError(f"{path} is empty, not a GGUF file") from None
    cursor = _Cursor(data, path)
    if bytes(data[:4]) != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic)")
    cursor.take(4, "the magic")
    version = cursor.scalar(_U32, "the version")
    if version not in _VERSIONS:
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (only {_VERSIONS}, little-endian)")
    num_tensors, num_fields = cursor.scalar(_U64, "the tensor count"), cursor.scalar(_U64, "the metadata count")
    fields: dict[str, object] = {}
    for _ in range(num_fields):
        key = cursor.string("a metadata key")
        if key in fields:
            raise ModelLoadError(f"{path}: metadata key {key!r} appears twice")
        fields[key] = _value(cursor, cursor.scalar(_U32, "a metadata type"), depth=0)
    table = [_tensor_entry(cursor) for _ in range(num_tensors)]
    if len({entry[0] for entry in table}) != len(table):
        raise ModelLoadError(f"{path}: a tensor name appears twice in the tensor table")
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"{path}: general.alignment must be a power of two, got {alignment!r}")
    start = -(-cursor.offset // alignment) * alignment
    return GGUFHeader(fields, [_tensor(data, start, *entry) for entry in table])


def _value(cursor: _Cursor, value_type: int, depth: int):
    if value_type in _SCALARS:
        return cursor.scalar(value_type, "a metadata value")
    if value_type == _STRING:
        return cursor.string("a metadata string")
    if value_type == _ARRAY and depth < _MAX_DEPTH:
        item_type, count = cursor.scalar(_U32, "an array's item type"), cursor.scalar(_U64, "an array's length")
        if item_type in _SCALARS:
            size = struct.calcsize(_SCALARS[item_type])
            start = cursor.take(count * size, "an array")
            return np.frombuffer(cursor.data, np.dtype(_SCALARS[item_type]), count, start).tolist()
        if count > (len(cursor.data) - cursor.offset) // 8:  # every string or array item takes >= 8 bytes
            raise ModelLoadError(f"{cursor.path}: an array at byte {cursor.offset} claims {count} items, "
                                 "more than the file can hold")
        return [_value(cursor, item_type, depth + 1) for _ in range(count)]
    raise ModelLoadError(f"{cursor.path}: unknown metadata type {value_type} (or arrays nested too deep) "
                         f"before byte {cursor.offset}")


def _tensor_entry(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string("a tensor name")
    dims = cursor.scalar(_U32, "a tensor's dimension count")
    if dims > _MAX_DIMS:
        raise ModelLoadError(f"{cursor.path}: tensor {name} claims {dims} dimensions")
    shape = tuple(cursor.scalar(_U64, "a tensor's shape") for _ in range(dims))
    return name, shape, cursor.scalar(_U32, "a tensor's type"), cursor.scalar(_U64, "a tensor's offset")


def _tensor(data: mmap.mmap, start: int, name: str, shape: tuple[int, ...], type_id: int,
            offset: int) -> GGUFTensorInfo:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        tensor_type = GGMLQuantizationType(type_id)
    except ValueError:
        raise ModelLoadError(f"tensor {name} has unknown GGUF type {type_id}") from None
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    rows = tuple(reversed(shape))
    if not rows or rows[-1] % block_size:
        raise ModelLoadError(f"tensor {name} of shape {rows} is not whole blocks of its type {tensor_type.name}")
    n_elements = int(np.prod(shape, dtype=object))
    n_bytes = n_elements // block_size * type_size
    begin = start + offset
    if begin + n_bytes > len(data):
        raise ModelLoadError(f"tensor {name} of shape {rows} needs {n_bytes} bytes at byte {begin} but the file "
                             f"ends before: the file is truncated or corrupt")
    dtype = _PLAIN_DTYPES.get(tensor_type.name)
    if dtype is None:
        dtype, rows = np.uint8, (*rows[:-1], rows[-1] // block_size * type_size)
    view = np.frombuffer(data, np.uint8, n_bytes, begin).view(dtype).reshape(rows)
    return GGUFTensorInfo(name, tensor_type, shape, n_elements, n_bytes, view)

"""safetensors files: the one reader and writer of the format, for checkpoints, trace files and optimizer state.

The format: 8 bytes (little-endian) giving the header's length N, then N bytes of JSON

    {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}

padded with spaces to a multiple of 8, then the data: the tensors' row-major little-endian bytes, back to back,
offsets counted from the data's start. BF16 is ml_dtypes.bfloat16.

Reading: a file is untrusted input (docs/security.md): its header is checked as strictly as the safetensors library
checks it, and its tensors are read-only memory-mapped views, so a large file costs no memory until a tensor is used.
Writing streams: the header is computed up front from the shapes and dtypes, then the tensors are written one at a
time (Writer). write_safetensors orders the tensors as the library does, so its files are the library's, byte for
byte (the library orders several metadata keys by its hash map, so those may come in another order).
Every error names the file and, where one is at fault, the tensor.
"""

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from . import files

BF16 = np.dtype(ml_dtypes.bfloat16)  # the project's one bfloat16 dtype
# safetensors code -> NumPy dtype, in the safetensors library's data order (its Dtype enum, largest first)
DTYPES = {
    "I64": np.dtype("<i8"), "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "I32": np.dtype("<i4"), "BF16": BF16,
    "F16": np.dtype("<f2"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}  # NumPy dtype -> safetensors code
MAX_HEADER_BYTES = files.LIMITS["header"]  # the safetensors library's MAX_HEADER_SIZE
MAX_NDIM = 64  # NumPy's most dimensions


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read or written: the message names the file and the tensor at fault."""


def little_endian(dtype):
    """`dtype` in the format's byte order (a big-endian array is written byte-swapped, as the library writes it)."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def code_of(path, name, dtype):
    """The safetensors code of `dtype` for tensor `name` of file `path`; SafetensorsError if the format has none."""
    code = CODES.get(little_endian(dtype))
    if code is None:
        raise SafetensorsError(f"{path}: tensor {files.shown(name)} has dtype {np.dtype(dtype)}, which safetensors "
                               f"cannot hold here (it takes {', '.join(str(d) for d in CODES)})")
    return code


# ---------------------------------------------------------------------------------------------- reading

def _read_header(f, path, size):
    # f: the open file, size: its bytes -> (header {name: entry}, metadata {str: str}, data start)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path}: the safetensors header claims {header_len:,} bytes, over the "
                               f"{MAX_HEADER_BYTES:,}-byte cap (the safetensors library's)")
    if header_len > size - 8:
        raise SafetensorsError(f"{path}: corrupt or truncated safetensors file: header claims {header_len} "
                               f"bytes but the file has {size}")
    try:
        header = files.parse_json(f.read(header_len).decode("utf-8"), f"{path} header")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header (not UTF-8: {e.reason})") from None
    except files.FileError as e:
        raise SafetensorsError(str(e)) from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: the header's __metadata__ must map strings to strings, got "
                               f"{files.shown(metadata)}")
    return header, metadata, 8 + header_len


def _entry(path, name, info):
    # one header entry -> (begin, end, dtype, shape), checked as the safetensors library checks it
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {files.shown(name)} has a malformed header entry "
                               f"{files.shown(info)}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (begin, end, *shape)):
        raise SafetensorsError(f"{path}: tensor {files.shown(name)} has a malformed header entry "
                               f"{files.shown(info)} (offsets and shape must be integers >= 0)")
    if len(shape) > MAX_NDIM:
        raise SafetensorsError(f"{path}: tensor {files.shown(name)} has {len(shape)} dimensions, more than "
                               f"{MAX_NDIM}")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        dtype_text = dtype_name[:16] if isinstance(dtype_name, str) else files.shown(dtype_name)
        raise SafetensorsError(f"{path}: tensor {files.shown(name)} has unsupported dtype {dtype_text}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize  # exact: a huge shape cannot wrap around as int64 would
    if end - begin != expected:
        raise SafetensorsError(f"{path}: tensor {files.shown(name)} is corrupt: shape {list(shape)} {dtype_name} "
                               f"needs {expected} bytes, header gives offsets [{begin}, {end})")
    return begin, end, dtype, shape


def _check_layout(path, entries, data_size):
    # entries: {name: (begin, end, ...)}: the tensors must tile the data exactly, as the safetensors library
    # requires: sorted by offset, each starts where the one before ends (no overlap, no gap), the last ends at the end
    end_so_far, before = 0, None
    for name, (begin, end, *_) in sorted(entries.items(), key=lambda item: item[1][:2]):
        if begin != end_so_far:
            raise SafetensorsError(
                f"{path}: tensor {files.shown(name)} starts at data byte {begin}, but "
                + (f"{files.shown(before)} ends at {end_so_far}" if before is not None else "the data starts at 0")
                + f": tensors must follow each other without {'overlap' if begin < end_so_far else 'gap'}")
        end_so_far, before = end, name
    if end_so_far != data_size:
        raise SafetensorsError(f"{path}: the tensors cover {end_so_far} bytes of data, but the file holds "
                               f"{data_size} after its header")


def read_safetensors(path, with_metadata=False):
    """name -> read-only memory-mapped array, for every tensor of one .safetensors file, in the header's order, its
    header checked as strictly as the safetensors library checks it; with_metadata: (that, the header's
    __metadata__). The file is opened through reference/io/files.py (a regular file, no link out of its folder
    when the caller checked the path with files.inside); its refusals are SafetensorsErrors too."""
    path = os.fspath(path)
    try:
        f = files.open_file(path, None)
    except files.FileError as error:
        raise SafetensorsError(str(error)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        header, metadata, data_start = _read_header(f, path, size)
        entries = {name: _entry(path, name, info) for name, info in header.items()}
        for name, (begin, end, _, _) in entries.items():
            if data_start + end > size:
                raise SafetensorsError(f"{path}: truncated file: tensor {files.shown(name)} ends at byte "
                                       f"{data_start + end} but the file has {size} bytes")
        _check_layout(path, entries, size - data_start)
        try:
            mapped = np.memmap(f, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
        except OSError as error:  # e.g. too many open files: every mapped shard keeps one
            raise SafetensorsError(f"{path}: cannot be memory-mapped: {error.strerror or error}") from None
    tensors = {name: mapped[data_start + begin:data_start + end].view(dtype).reshape(shape)
               for name, (begin, end, dtype, shape) in entries.items()}
    return (tensors, metadata) if with_metadata else tensors


# ---------------------------------------------------------------------------------------------- writing

def header_bytes(path, specs, metadata=None):
    """The header of a file holding `specs` [(name, dtype, shape)] in that data order, as the library encodes it:
    compact JSON, UTF-8 unescaped, __metadata__ first (when given), spaces up to a multiple of 8, the length before."""
    header = {} if metadata is None else {"__metadata__": dict(metadata)}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header.get("__metadata__", {}).items()):
        raise SafetensorsError(f"{path}: metadata must map strings to strings, got {files.shown(metadata)}")
    offset = 0
    for name, dtype, shape in specs:
        if not isinstance(name, str) or name == "__metadata__" or name in header:
            raise SafetensorsError(f"{path}: tensor name {files.shown(name)} is "
                                   f"{'given twice' if name in header else 'not allowed'}")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": code_of(path, name, dtype), "shape": [int(n) for n in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


class StagedFile:
    """A file written in stages, as a context manager: close() on success makes it, discard() on an error leaves
    nothing behind."""

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if kind is None:
            self.close()
        else:
            self.discard()


class Writer(StagedFile):
    """Stream tensors into a safetensors file: the header comes from `specs` [(name, dtype, shape)], in the order
    the data will follow; then write(name, array) each tensor in that order. The file appears at `path` only when
    close() has checked that every tensor was written (until then it is `path`.partial). Memory: the caller's one
    tensor at a time.

        with Writer("x.safetensors", [("w", np.float32, (2, 3))], {"format": "pt"}) as writer:
            writer.write("w", np.ones((2, 3), np.float32))
    """

    def __init__(self, path, specs, metadata=None):
        self.path = os.fspath(path)
        self.specs = [(name, little_endian(dtype), tuple(shape)) for name, dtype, shape in specs]
        header = header_bytes(self.path, self.specs, metadata)  # errors before any file is made
        self._partial = self.path + ".partial"
        self._file = open(self._partial, "wb")  # OSError here names the unwritable path, before any work
        self._file.write(header)
        self._written = 0

    def write(self, name, array):
        """Write the next tensor: `name` and the array's dtype and shape must be what specs said."""
        if self._written == len(self.specs):
            raise SafetensorsError(f"{self.path}: tensor {files.shown(name)} is one more than the header lists")
        want, dtype, shape = self.specs[self._written]
        array = np.asarray(array)
        if name != want or little_endian(array.dtype) != dtype or array.shape != shape:
            raise SafetensorsError(f"{self.path}: got tensor {files.shown(name)} {array.dtype} {list(array.shape)}, "
                                   f"the header lists {files.shown(want)} {dtype} {list(shape)} next")
        self._file.write(np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8))
        self._written += 1

    def close(self):
        if self._written != len(self.specs):
            self.discard()
            raise SafetensorsError(f"{self.path}: tensor {files.shown(self.specs[self._written][0])} (and "
                                   f"{len(self.specs) - self._written - 1} more) was never written")
        self._file.close()
        os.replace(self._partial, self.path)

    def discard(self):
        """Leave nothing behind: the partial file is removed."""
        self._file.close()
        os.remove(self._partial)


def write_safetensors(path, tensors, metadata=None):
    """Write {name: array} to `path` (metadata: {str: str}, e.g. HF's {"format": "pt"}), the tensors ordered as the
    safetensors library orders them (by dtype in DTYPES' order, then by name): the library's file, byte for byte."""
    rank = {code: i for i, code in enumerate(DTYPES)}
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    order = sorted(arrays, key=lambda n: (rank[code_of(path, n, arrays[n].dtype)], n))
    with Writer(path, [(n, arrays[n].dtype, arrays[n].shape) for n in order], metadata) as writer:
        for name in order:
            writer.write(name, arrays[name])

"""RawModule / RawKernel: CUDA C++ compiled for the host (cudasim/compiler.py), launched by the core.

A launch checks each argument against the kernel's parameter types (a device array for a pointer, a NumPy
scalar of the parameter's exact size for a number: CuPy passes a scalar's own bytes, so a mismatch would be read
as garbage on a GPU) and runs every block, one after another, in the order CUDASIM_BLOCK_ORDER names:
`forward` (the default), `reverse`, or `random` / `random:SEED`.
"""

import ctypes
import os
import struct

import numpy as np

from . import compiler, memory, streams
from .array import ndarray


class KernelError(RuntimeError):
    """A CUDA rule broken while a kernel ran (divergent barrier, bad mask, invalid access, ...), named."""


_PACK = {"i1": "b", "i2": "h", "i4": "i", "i8": "q", "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "f4": "f",
         "f8": "d", "b1": "?"}
_NAMES = {"i4": "int", "i8": "long long", "u4": "unsigned int", "u8": "unsigned long long", "f4": "float",
          "f8": "double", "i2": "short", "u2": "unsigned short", "i1": "signed char", "u1": "unsigned char",
          "b1": "bool", "p": "a pointer"}


def block_order(num_blocks):
    """The order blocks run in: CUDASIM_BLOCK_ORDER = forward | reverse | random[:seed]."""
    spec = os.environ.get("CUDASIM_BLOCK_ORDER", "forward")
    kind, _, seed = spec.partition(":")
    if kind == "forward":
        return None
    if kind == "reverse":
        return np.arange(num_blocks - 1, -1, -1, dtype=np.uint32)
    if kind == "random":
        return np.random.default_rng(int(seed) if seed else None).permutation(num_blocks).astype(np.uint32)
    raise ValueError(f"CUDASIM_BLOCK_ORDER={spec!r}: use forward, reverse, random or random:SEED")


def _dims(value, what):
    dims = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise ValueError(f"{what} {value!r}: 1 to 3 positive sizes")
    return dims + (1,) * (3 - len(dims))


class RawKernel:
    def __init__(self, module, name):
        self.module, self.name = module, name
        lib = module._lib
        self._entry = ctypes.cast(getattr(lib, f"cudasim_entry_{name}"), ctypes.c_void_p).value
        signature = getattr(lib, f"cudasim_signature_{name}")
        signature.restype = ctypes.c_char_p
        self.params = [p for p in signature().decode().split(",") if p]

    def _marshal(self, args):
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        slots, keep = [], []
        for i, (code, value) in enumerate(zip(self.params, args)):
            where = f"argument {i} of kernel {self.name} ({_NAMES.get(code, code)})"
            if code == "p":
                if isinstance(value, ndarray):
                    keep.append(value)
                    slots.append(struct.pack("Q", value._a.__array_interface__["data"][0]))
                elif value is None:
                    slots.append(struct.pack("Q", 0))
                elif isinstance(value, np.integer) and value.dtype.itemsize == 8:
                    slots.append(struct.pack("Q", int(value) & (2**64 - 1)))  # a raw address (np.uint64(0): null)
                elif isinstance(value, np.ndarray):
                    raise TypeError(f"{where} is a host NumPy array; pass a device array")
                else:
                    raise TypeError(f"{where} needs a device array, got {type(value).__name__}")
                continue
            if code not in _PACK:
                raise TypeError(f"{where}: a parameter type cudasim cannot pass")
            if isinstance(value, ndarray):
                raise TypeError(f"{where} is a number, got a device array")
            if isinstance(value, (bool, int, float)) and not isinstance(value, np.generic):
                kind = "b1" if isinstance(value, bool) else "i8" if isinstance(value, int) else "f8"
                if not (kind == code or (kind == "i8" and code == "u8")):
                    raise TypeError(f"{where} got a Python {type(value).__name__}, which CuPy passes as "
                                    f"{_NAMES[kind]}: pass a NumPy scalar of the parameter's type")
                slots.append(struct.pack(_PACK[code], value))
                continue
            dt = np.asarray(value).dtype
            if (dt.kind == "f") != (code[0] == "f") or dt.itemsize != int(code[1:]):
                raise TypeError(f"{where} got {dt.name} ({dt.itemsize} bytes): the kernel would read other bytes")
            slots.append(struct.pack(_PACK[code], value.item()))
        return slots, keep

    def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if block[0] * block[1] * block[2] > 1024:
            raise ValueError(f"kernel {self.name}: {block} is more than 1024 threads per block")
        if shared_mem:
            raise NotImplementedError(f"kernel {self.name}: dynamic shared memory (shared_mem={shared_mem}) is not "
                                      "supported by cudasim")
        slots, keep = self._marshal(tuple(args))
        buffers = [ctypes.create_string_buffer(s, 8) for s in slots]
        pointers = (ctypes.c_void_p * max(len(buffers), 1))(*[ctypes.addressof(b) for b in buffers])
        num_blocks = grid[0] * grid[1] * grid[2]

        def work():
            order = block_order(num_blocks)
            order_ptr = None if order is None else order.ctypes.data_as(ctypes.POINTER(ctypes.c_uint))
            error = ctypes.create_string_buffer(2048)
            lib = compiler.core()
            status = lib.cudasim_launch(self._entry, pointers, self.name.encode(), (ctypes.c_uint * 3)(*grid),
                                        (ctypes.c_uint * 3)(*block), order_ptr, num_blocks,
                                        self.module._shared[0], self.module._shared[1], error, len(error))
            _ = (keep, buffers)  # the arguments live as long as the (possibly recorded) launch
            if status:
                message = error.value.decode(errors="replace")
                fault = ctypes.c_size_t.in_dll(lib, "cudasim_fault_address").value
                if fault:
                    message += f": {memory.describe_address(fault)}"
                code = \
                    ctypes.string_at(ctypes.addressof(ctypes.c_char.in_dll(lib, "cudasim_fault_code"))).decode()
                if code:
                    message += compiler.source_line(code)
                raise KernelError(message)

        streams.submit(work, f"kernel {self.name}")


class RawModule:
    """cupy.RawModule(code=..., options=...): the source compiled once for the host, its kernels by name."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None:
            if path is None:
                raise ValueError("RawModule needs code= or path=")
            with open(path) as f:
                code = f.read()
        if name_expressions:
            raise NotImplementedError("RawModule(name_expressions=...) is not supported by cudasim")
        self.path, self.names = compiler.build_module(code, tuple(options))
        compiler.core()  # the symbols the module calls
        self._lib = ctypes.CDLL(self.path)
        anchor, variables = compiler.shared_variables(self.path)
        base = ctypes.cast(self._lib.cudasim_module_anchor, ctypes.c_void_p).value - anchor
        ranges = [v for offset, size in variables for v in (base + offset, base + offset + size)]
        self._shared = ((ctypes.c_uint64 * max(len(ranges), 1))(*ranges), len(ranges) // 2)
        self._kernels = {}

    def get_function(self, name):
        if name not in self.names:
            raise KeyError(f"no __global__ function {name!r} in this module (it has {', '.join(self.names)})")
        if name not in self._kernels:
            self._kernels[name] = RawKernel(self, name)
        return self._kernels[name]


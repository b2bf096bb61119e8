"""Device memory on the host: every allocation is its own mapping between two guard pages, NaN-filled.

The data ends where its last page ends (start 16-byte aligned), so an access past the end faults on the guard
page and the launch reports it; memory is filled with 0x7fff7fff words (NaN as float32, float64 and bf16, a huge
index as an integer), so reading what nobody wrote shows up. `using_allocator` and the pool mirror CuPy's.
"""

import contextlib
import ctypes
import threading
import weakref

from . import compiler, streams

_live = weakref.WeakValueDictionary()  # map base -> Memory, to describe a faulting address


class OutOfMemoryError(MemoryError):
    pass


class Memory:
    """One device allocation (`ptr`, `size` bytes); unmapped when the last reference goes."""

    def __init__(self, size):
        base, length = ctypes.c_size_t(), ctypes.c_size_t()
        core = compiler.core()
        ptr = core.cudasim_malloc(max(int(size), 1), ctypes.byref(base), ctypes.byref(length))
        if not ptr:
            raise OutOfMemoryError(f"cudasim: cannot map {size} bytes")
        self.ptr, self.size, self._base, self._length = ptr, int(size), base.value, length.value
        self._free = core.cudasim_free  # held here: at interpreter exit the module's globals may be gone first
        _live[self._base] = self

    def __del__(self):
        self._free(self._base, self._length)


class MemoryPointer:
    """CuPy's MemoryPointer: `mem` (the allocation) and `ptr` (an address inside it)."""

    def __init__(self, mem, offset=0):
        self.mem, self.ptr = mem, mem.ptr + offset


def describe_address(address):
    """Where a faulting address lies relative to the allocations still alive."""
    for mem in list(_live.values()):
        if mem._base <= address < mem._base + mem._length:
            if address >= mem.ptr + mem.size:
                return f"{address - (mem.ptr + mem.size)} bytes past the end of a {mem.size}-byte allocation"
            if address < mem.ptr:
                return f"{mem.ptr - address} bytes before the start of a {mem.size}-byte allocation"
    return "outside every live allocation"


class MemoryPool:
    """CuPy's pool, without pooling: each malloc maps fresh NaN-filled memory."""

    def __init__(self):
        self._used = 0

    def malloc(self, size):
        if streams.capturing_stream() is not None:
            raise streams.CUDARuntimeError(
                "cudaErrorStreamCaptureUnsupported: a device allocation (pool malloc) during stream capture; a "
                "captured graph may only use memory allocated before the capture or by a custom allocator")
        return MemoryPointer(Memory(size))

    def free_all_blocks(self):
        pass

    def used_bytes(self):
        return sum(m.size for m in list(_live.values()))

    def total_bytes(self):
        return self.used_bytes()


_pool = MemoryPool()
_state = threading.local()


def get_default_memory_pool():
    return _pool


def get_allocator():
    return getattr(_state, "allocator", None) or _pool.malloc


@contextlib.contextmanager
def using_allocator(allocator=None):
    previous = getattr(_state, "allocator", None)
    _state.allocator = allocator
    try:
        yield
    finally:
        _state.allocator = previous


def alloc(size):
    return get_allocator()(size)

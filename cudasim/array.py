"""A CuPy-shaped device array over cudasim's device memory, computed with NumPy.

`ndarray` wraps a NumPy view of device memory (`_a`). Host and device stay apart as in CuPy: a NumPy array in a
device operation, or np.asarray(device array), is a TypeError; `.get()` / `asnumpy` copy to the host. Every
operation goes through `_op`: the NumPy result is a view of the operand (reshape, slicing, transpose: no work) or
new data, which is copied into a fresh device allocation (from the current allocator) by work submitted to the
stream, so that graph capture records it and replay recomputes it.
"""

import numpy as np

from . import memory, streams


class _Buffer:
    """Exposes device memory to NumPy (the array's base, keeping the MemoryPointer alive)."""

    def __init__(self, memptr, nbytes):
        self.memptr = memptr
        self.__array_interface__ = {"data": (memptr.ptr, False), "shape": (nbytes,), "typestr": "|u1",
                                    "version": 3}


def _view_of(memptr, shape, dtype, strides=None):
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.asarray(_Buffer(memptr, max(count * dtype.itemsize, 1)))[:count * dtype.itemsize]
    flat = raw.view(dtype)
    if strides is None:
        return flat.reshape(shape)
    return np.lib.stride_tricks.as_strided(flat, shape, strides)


def _host(x):
    """A device array's NumPy view; a NumPy array is refused (CuPy's rule); anything else passes."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a NumPy array in a device operation (use cupy.asarray)")
    if isinstance(x, (list, tuple)):
        return type(x)(_host(v) for v in x)
    return x


def _new(shape, dtype):
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return ndarray._wrap(_view_of(memory.alloc(count * dtype.itemsize), shape, dtype))


def _result(compute, sources, what):
    """The result of `compute()` (NumPy on host views) as device arrays: views stay views of `sources`, new
    data goes to fresh device memory by submitted work."""
    res = compute()
    if isinstance(res, tuple):
        return tuple(_one(r, compute, i, sources, what) for i, r in enumerate(res))
    return _one(res, compute, None, sources, what)


def _one(res, compute, index, sources, what):
    if not isinstance(res, (np.ndarray, np.generic)):
        return res
    res = np.asarray(res)
    if res.size and any(isinstance(s, np.ndarray) and np.may_share_memory(res, s) for s in sources):
        return ndarray._wrap(res)
    out = _new(res.shape, res.dtype)
    target = out._a
    if streams.capturing_stream() is None:
        target[...] = res
    else:  # recorded: each replay recomputes from what the inputs hold then
        def work():
            target[...] = compute() if index is None else compute()[index]

        streams.submit(work, what)
    return out


class ndarray:
    """A device array: shape, dtype, strides, arithmetic and indexing as NumPy's, memory on the device."""

    __array_priority__ = 100

    @classmethod
    def _wrap(cls, view):
        self = object.__new__(cls)
        self._a = view
        return self

    def __init__(self, shape, dtype=float, memptr=None, strides=None):
        memptr = memptr or memory.alloc(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        self._a = _view_of(memptr, shape, dtype, strides)

    # ---- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: self._op(lambda a: a.T, "transpose"))

    @property
    def data(self):
        base = self._a
        while not isinstance(base, _Buffer) and base is not None:
            base = base.base
        mem = base.memptr.mem if base is not None else None
        ptr = self._a.__array_interface__["data"][0]
        pointer = memory.MemoryPointer(mem, ptr - mem.ptr) if mem is not None else None
        return pointer

    @property
    def device(self):
        from .cuda import Device
        return Device(0)

    def __len__(self):
        return len(self._a)

    def __getattr__(self, name):  # only for names the class does not define
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"cudasim.ndarray does not provide .{name} (the CPU emulator covers the CuPy array API "
                             "its users call)")

    def __repr__(self):
        return "cudasim." + repr(self._a) if streams.capturing_stream() is None else "<cudasim.ndarray (capturing)>"

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")

    # ---- host transfers
    def get(self, stream=None, order="C", out=None):
        streams.check_not_capturing("a device-to-host copy (.get())")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)

    def set(self, arr, stream=None):
        streams.check_not_capturing("a host-to-device copy (.set())")
        arr = np.asarray(arr)
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set: shape/dtype {arr.shape} {arr.dtype} differ from {self.shape} {self.dtype}")
        self._a[...] = arr

    def item(self):
        streams.check_not_capturing("reading a device value (.item())")
        return self._a.item()

    def tolist(self):
        return self.get().tolist()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        return int(self.item())

    def __bool__(self):
        return bool(self.item())

    # ---- operations
    def _op(self, fn, what, *args, **kwargs):
        a, args, kwargs = self._a, _host(args), {k: _host(v) for k, v in kwargs.items()}
        return _result(lambda: fn(a, *args, **kwargs), [a], what)

    def __getitem__(self, key):
        return self._op(lambda a, k: a[k], "indexing", key)

    def __setitem__(self, key, value):
        a, key = self._a, _host(key)
        value = value._a if isinstance(value, ndarray) else value  # host values are copied in (as CuPy does)

        def work():
            a[key] = value

        streams.submit(work, "assignment")

    def fill(self, value):
        self[...] = value

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return self._op(lambda a: a.astype(dtype, order=order), "astype")

    def copy(self, order="C"):
        return self._op(lambda a: a.copy(order=order), "copy")

    def view(self, dtype=None):
        return self._op(lambda a: a.view(dtype), "view")

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        ins = _host(inputs)
        sources = [x for x in ins if isinstance(x, np.ndarray)]
        if out is not None:
            outs = _host(out)

            def work():
                getattr(ufunc, method)(*ins, out=outs, **kwargs)

            streams.submit(work, f"ufunc {ufunc.__name__}")
            return out[0] if len(out) == 1 else out
        return _result(lambda: getattr(ufunc, method)(*ins, **kwargs), sources, f"ufunc {ufunc.__name__}")

    def __array_function__(self, func, types, args, kwargs):
        hargs, hkwargs = _host(args), {k: _host(v) for k, v in kwargs.items()}
        sources = [x for x in _flat(hargs) if isinstance(x, np.ndarray)]
        return _result(lambda: func(*hargs, **hkwargs), sources, func.__name__)


def _flat(items):
    for x in items:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        else:
            yield x


def _forward(name):
    def method(self, *args, **kwargs):
        return self._op(lambda a, *xs, **kw: getattr(a, name)(*xs, **kw), name, *args, **kwargs)
    method.__name__ = name
    return method


for _name in ("reshape", "transpose", "swapaxes", "squeeze", "ravel", "flatten", "sum", "mean", "max", "min",
              "argmax", "argmin", "any", "all", "cumsum", "prod", "std", "var", "clip", "round", "nonzero", "dot",
              "repeat", "take", "diagonal", "conj", "argsort", "sort"):
    setattr(ndarray, _name, _forward(_name))


def _binary(name):
    def method(self, *args):
        return self._op(lambda a, *xs: getattr(a, name)(*xs), name, *args)
    method.__name__ = name
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift", "and", "or", "xor",
              "matmul"):
    for _form in (f"__{_name}__", f"__r{_name}__"):
        setattr(ndarray, _form, _binary(_form))
for _name in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__neg__", "__pos__", "__abs__",
              "__invert__"):
    setattr(ndarray, _name, _binary(_name))
ndarray.__hash__ = None


def _inplace(name):
    ufunc = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide, "lshift": np.left_shift,
             "rshift": np.right_shift, "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}[name]

    def method(self, other):
        self.__array_ufunc__(ufunc, "__call__", self, other, out=(self,))
        return self
    return method


for _name in ("add", "sub", "mul", "truediv", "lshift", "rshift", "and", "or", "xor"):
    setattr(ndarray, f"__i{_name}__", _inplace(_name))


# ------------------------------------------------------------------------------------------ creation

def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.asarray(a, dtype=dtype)
    streams.check_not_capturing("a host-to-device copy (asarray)")
    out = _new(host.shape, host.dtype)
    out._a[...] = host
    return out


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, ndarray):
        return a.astype(dtype or a.dtype) if copy else asarray(a, dtype)
    return asarray(np.array(a, dtype=dtype, ndmin=ndmin))


def ascontiguousarray(a, dtype=None):
    a = asarray(a, dtype)
    return a if a.flags.c_contiguous else a.copy()


def asnumpy(a, stream=None, order="C", out=None):
    return a.get(order=order, out=out) if isinstance(a, ndarray) else np.asarray(a, order=order)


def empty(shape, dtype=float, order="C"):
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    return _new(shape, dtype)


def full(shape, fill_value, dtype=None):
    dtype = dtype or np.asarray(fill_value).dtype
    out = empty(shape, dtype)
    out.fill(fill_value)
    return out


def zeros(shape, dtype=float, order="C"):
    return full(shape, 0, dtype)


def ones(shape, dtype=float, order="C"):
    return full(shape, 1, dtype)


def empty_like(a, dtype=None, shape=None):
    return empty(a.shape if shape is None else shape, dtype or a.dtype)


def zeros_like(a, dtype=None):
    return zeros(a.shape, dtype or a.dtype)


def full_like(a, fill_value, dtype=None):
    return full(a.shape, fill_value, dtype or a.dtype)


def arange(*args, dtype=None):
    return asarray(np.arange(*args, dtype=dtype))

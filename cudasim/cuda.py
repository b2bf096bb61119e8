"""cupy.cuda, as far as cudasim goes: the device, streams, events, graphs, allocators, the runtime's queries."""

import os
import types

from . import memory as memory_module
from .memory import MemoryPointer, using_allocator  # noqa: F401  (cupy.cuda names)
from .streams import CUDARuntimeError, Event, Graph, Stream, get_current_stream, get_elapsed_time  # noqa: F401

COMPUTE_CAPABILITY = "80"  # what the kernels are compiled for: __CUDA_ARCH__ 800 (runtime/cudasim.h)
SM_COUNT = int(os.environ.get("CUDASIM_SM_COUNT", "108"))  # what launch planning sees (an A100's count)


class Device:
    def __init__(self, device=None):
        self.id = int(device or 0)
        if self.id != 0:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: cudasim has one device, not {self.id}")
        self.compute_capability = COMPUTE_CAPABILITY
        self.attributes = {"MultiProcessorCount": SM_COUNT, "WarpSize": 32, "MaxThreadsPerBlock": 1024}

    def synchronize(self):
        from .streams import check_not_capturing
        check_not_capturing("device.synchronize()")

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _mem_info():
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields.get("MemAvailable", 0), fields.get("MemTotal", 0)


runtime = types.SimpleNamespace(
    CUDARuntimeError=CUDARuntimeError,
    getDeviceCount=lambda: 1,
    runtimeGetVersion=lambda: 12000,
    driverGetVersion=lambda: 12000,
    memGetInfo=_mem_info,
    getDeviceProperties=lambda device=0: {
        "name": b"cudasim (CPU emulation, sm_80)", "major": 8, "minor": 0, "multiProcessorCount": SM_COUNT,
        "totalGlobalMem": _mem_info()[1], "warpSize": 32, "maxThreadsPerBlock": 1024},
)
memory = types.SimpleNamespace(OutOfMemoryError=memory_module.OutOfMemoryError, MemoryPointer=MemoryPointer,
                               Memory=memory_module.Memory)


def __getattr__(name):
    raise AttributeError(f"cudasim does not provide cupy.cuda.{name}")

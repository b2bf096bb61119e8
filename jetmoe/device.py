"""`--device gpu`: the GPU twin (gpu/) behind the same calls the commands make on the NumPy reference.

The twin runs on CuPy and a CUDA GPU, or on the CPU emulator with JETMOE_GPU=emulate (gpu/device.py). Its outputs
are device arrays; the commands print, measure and compare on the host, so `HostModel` hands back NumPy arrays.
"""

import dataclasses

from reference.inputs import to_numpy

DEVICES = ("cpu", "gpu")
GPU_DTYPES = ("float32",)  # the twin's parity dtype; its bf16 weights are not offered by the CLI's --dtype


def host(value):
    """Device arrays (also inside tuples) -> NumPy; anything else as it is."""
    if isinstance(value, tuple):
        return tuple(host(v) for v in value)
    if hasattr(value, "get") and hasattr(value, "shape"):
        return to_numpy(value)
    return value


def host_output(out):
    """A model output dataclass with its arrays on the host (the KV cache stays on the device)."""
    fields = {f.name: host(getattr(out, f.name)) for f in dataclasses.fields(out) if f.name != "past_key_values"}
    return dataclasses.replace(out, **fields)


class HostModel:
    """A gpu/ model (or its inner JetMoeModel) whose calls and generate return host arrays."""

    def __init__(self, model):
        self.device_model, self.config = model, model.config

    def __call__(self, *args, **kwargs):
        return host_output(self.device_model(*args, **kwargs))

    def generate(self, *args, **kwargs):
        return to_numpy(self.device_model.generate(*args, **kwargs))

    @property
    def model(self):
        return HostModel(self.device_model.model)

    @property
    def dtype(self):
        return self.device_model.dtype


def load_gpu(model_dir, dtype):
    """The GPU twin of an HF directory as a HostModel; a missing CuPy/GPU is a user error naming what to do."""
    import gpu
    if dtype not in GPU_DTYPES:
        raise ValueError(f"--device gpu runs {', '.join(GPU_DTYPES)}, not --dtype {dtype}")
    try:
        return HostModel(gpu.JetMoeForCausalLM.from_pretrained(model_dir, dtype=dtype))
    except gpu.GpuUnavailable as error:
        raise ValueError(str(error)) from None

"""The CuPy twin of `reference/`: the same classes and call keywords, CUDA C kernels in gpu/kernels/.

`import gpu` needs only NumPy; using a model needs CuPy and a CUDA GPU (gpu.device.GpuUnavailable says what to
install otherwise). Config, checkpoint reading, tokenizer and trace names come from `reference/`.
"""

from reference import JetMoeConfig

from .device import GpuUnavailable, gpu_available

__all__ = ["JetMoeConfig", "GpuUnavailable", "gpu_available"]

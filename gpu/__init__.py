"""The CuPy twin of `reference/`: the same classes and call keywords, CUDA C kernels in gpu/kernels/.

`import gpu` needs only NumPy; using a model needs CuPy and a CUDA GPU (gpu.GpuUnavailable says what to install
otherwise), or JETMOE_GPU=emulate, which runs the same kernels on the CPU emulator cudasim (gpu/device.py,
docs/gpu.md). Config, checkpoint reading, tokenizer and trace names come from `reference/`; this package
re-implements only the math, file for file (norm, rope, routing, experts, attention, cache, model, generation).
"""

from reference import JetMoeConfig

from .device import GpuUnavailable, gpu_available
from .model import JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel

__all__ = ["JetMoeConfig", "JetMoeModel", "JetMoeForCausalLM", "JetMoeForSequenceClassification",
           "GpuUnavailable", "gpu_available"]

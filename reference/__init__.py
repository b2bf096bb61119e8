"""A readable NumPy JetMoE that matches Hugging Face transformers 4.56.2 (see README.md).

Shape legend: B batch, T tokens, S cached+new keys, D hidden, E experts, K top-k, H kv heads, Dh head dim,
F intermediate, V vocab.
"""

from .cache import KVCache
from .checkpoint import CheckpointError
from .config import JetMoeConfig
from .model import JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel
from .trace import Trace, capture, compare

__all__ = ["JetMoeConfig", "JetMoeModel", "JetMoeForCausalLM", "JetMoeForSequenceClassification", "KVCache",
           "CheckpointError", "Trace", "capture", "compare"]

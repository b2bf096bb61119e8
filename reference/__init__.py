"""A readable NumPy JetMoE that matches Hugging Face transformers 4.56.2 (see README.md).

Shape legend, the one every file of reference/, gpu/ and jetmoe/ points to:

  B   batch                      E   experts (num_local_experts)
  T   tokens of this forward     K   experts chosen per token (num_experts_per_tok, top-k)
  S   keys: cached + new         H   key/value heads (num_key_value_heads)
  D   hidden size                Dh  head dim (kv_channels)
  F   MLP expert intermediate    V   vocab
  L   layers                     N   = B*T, tokens flattened
  C   classes (num_labels)
  slot s = n*K + k               token n's k-th choice, the unit the experts are dispatched in

The modules, in forward order, each with the notebook that walks through it: counting, the whole model at a
glance (00); norm and rope (01), routing (02), linear and experts (03), attention and cache (04), model (the
block and the forward), losses and generation (05); config and precision set it up, and names is the one table
of the checkpoint's tensors (HF name, place in the model, shape). Around the math:
hf_classes holds HF's classes (JetMoeModel, JetMoeForCausalLM, JetMoeForSequenceClassification: keywords,
outputs, from_pretrained, generate; gpu/ derives its own from them), inputs their input checks, and
reference/io/ the IO and runtime: files, safetensors, checkpoint, mapped (the big-checkpoint runtime), tokenizer,
trace (recording), trace_files and compare.
Every op's backward sits beside its forward (`rms_norm_backward` in norm, `moe_backward` in experts, ...);
training.value_and_grad runs them in reverse; optim holds AdamW, clip_grad_norm and cosine_lr (08).
"""

from .cache import KVCache
from .config import JetMoeConfig
from .hf_classes import JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel
from .io.checkpoint import CheckpointError
from .io.compare import compare
from .io.trace import breakpoint, capture, steps, substitute
from .io.trace_files import Trace
from .optim import AdamW, clip_grad_norm, cosine_lr
from .training import value_and_grad

__all__ = ["JetMoeConfig", "JetMoeModel", "JetMoeForCausalLM", "JetMoeForSequenceClassification", "KVCache",
           "CheckpointError", "Trace", "capture", "compare", "breakpoint", "substitute", "steps", "value_and_grad",
           "AdamW", "clip_grad_norm", "cosine_lr"]

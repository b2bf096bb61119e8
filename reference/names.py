"""JetMoE's tensors, in one table: each checkpoint tensor's HF name, its place in the model, shape and role.

Shapes: in the legend's symbols (reference/__init__.py). A block's tensor names are spelled here only: model.py
(BlockWeights, block_weights and block_leaves), io/checkpoint.py (the shapes a checkpoint must have),
counting.py (the part each parameter counts in) and gpu/model.py (what stays float32 in its bf16 mode) derive
theirs from it;
tests/reference/test_names.py checks that they agree and that the table covers a real checkpoint.
"""

import math
import re
from dataclasses import dataclass

# Prefixes a base-model tensor may carry: "model." in HF's CausalLM and SequenceClassification checkpoints,
# "transformer." being JetMoePreTrainedModel.base_model_prefix.
BASE_PREFIXES = ("model.", "transformer.")
_PREFIX = "(?:" + "|".join(re.escape(p) for p in BASE_PREFIXES) + ")?"

# The legend's symbols -> the config field each stands for (C: the classifier head's labels).
SYMBOLS = {"D": "hidden_size", "E": "num_local_experts", "H": "num_key_value_heads", "Dh": "kv_channels",
           "F": "intermediate_size", "V": "vocab_size", "C": "num_labels"}


@dataclass(frozen=True)
class Tensor:
    suffix: str  # HF name: after "layers.{i}." for a block's tensor, whole (prefix-free) otherwise
    place: tuple  # where the model holds it: (BlockWeights field,) or (BlockWeights field, ExpertWeights field),
    #               or the model class's attribute
    shape: tuple  # legend symbols and products of them, e.g. ("E", "H*Dh", "D")
    part: str | None  # what it counts as in reference/counting.py's PARTS (None: not a causal LM's)
    float32: bool = False  # kept float32 in the GPU's bf16 mode: small, and routers decide which experts run

    def name(self, layer=None):
        # -> the HF name without "model." (of layer `layer` for a block's tensor)
        return self.suffix if layer is None else f"layers.{layer}.{self.suffix}"

    def dims(self, config):
        # -> the shape in numbers, for `config`
        return tuple(math.prod(getattr(config, SYMBOLS[s]) if s in SYMBOLS else int(s) for s in dim.split("*"))
                     for dim in self.shape)


# Every block's tensors, in the order a checkpoint lists them (random_parameters draws them in this order).
BLOCK_TENSORS = (
    Tensor("input_layernorm.weight", ("input_layernorm",), ("D",), "norms and biases", float32=True),
    Tensor("self_attention.kv_proj.weight", ("attention", "kv_proj"), ("2*H*Dh", "D"), "kv_proj"),
    Tensor("self_attention.experts.bias", ("attention", "bias"), ("D",), "norms and biases", float32=True),
    Tensor("self_attention.experts.input_linear.weight", ("attention", "input_linear"), ("E", "H*Dh", "D"),
           "query experts"),
    Tensor("self_attention.experts.output_linear.weight", ("attention", "output_linear"), ("E", "D", "H*Dh"),
           "output experts"),
    Tensor("self_attention.experts.router.layer.weight", ("attention", "router"), ("E", "D"), "routers",
           float32=True),
    Tensor("post_attention_layernorm.weight", ("post_attention_layernorm",), ("D",), "norms and biases",
           float32=True),
    Tensor("mlp.bias", ("mlp", "bias"), ("D",), "norms and biases", float32=True),
    Tensor("mlp.input_linear.weight", ("mlp", "input_linear"), ("E", "2*F", "D"), "MLP experts"),
    Tensor("mlp.output_linear.weight", ("mlp", "output_linear"), ("E", "D", "F"), "MLP experts"),
    Tensor("mlp.router.layer.weight", ("mlp", "router"), ("E", "D"), "routers", float32=True),
)

# The tensors outside the blocks: every model's, then each head's (a tied lm_head is the embedding, not stored).
BASE_TENSORS = (Tensor("embed_tokens.weight", ("embed_tokens",), ("V", "D"), "embedding and head"),
                Tensor("norm.weight", ("norm",), ("D",), "norms and biases", float32=True))
HEAD_TENSORS = {"base": (), "causal_lm": (Tensor("lm_head.weight", ("lm_head",), ("V", "D"), "embedding and head"),),
                "sequence_classification": (Tensor("score.weight", ("score",), ("C", "D"), None),)}


def tensor_of(name):
    """The table's row of an HF tensor name, or a ValueError. The name may carry one of BASE_PREFIXES."""
    in_block = re.fullmatch(_PREFIX + r"layers\.\d+\.(.+)", name)
    suffix = in_block[1] if in_block else re.fullmatch(_PREFIX + "(.+)", name)[1]
    rows = BLOCK_TENSORS if in_block else (*BASE_TENSORS, *(t for head in HEAD_TENSORS.values() for t in head))
    for t in rows:
        if t.suffix == suffix:
            return t
    raise ValueError(f"tensor {name!r} is not one of JetMoE's (reference/names.py)")

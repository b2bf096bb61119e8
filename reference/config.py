"""JetMoE hyper-parameters: the same fields, defaults and config.json format as HF's `JetMoeConfig`.

The letters after each size field are the shape legend's (reference/__init__.py).

Notebook: notebooks/05_the_whole_model.ipynb.
"""

import json
import math
import os
from dataclasses import dataclass, field, fields

from .io.files import inside, read_json_object, shown


SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels", "intermediate_size",
         "max_position_embeddings", "num_local_experts", "num_experts_per_tok")
MAX_SIZE = 2**31 - 1  # sizes and token ids: what an int32 holds, as in every framework's embedding and shapes
MAX_LAYERS = 1 << 16  # the checkpoint's expected names are listed per layer before any tensor is read
FLOATS = ("rms_norm_eps", "rope_theta", "aux_loss_coef", "initializer_range", "attention_dropout")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


DEFAULT_ROPE_THETA = 10000.0  # both versions' value when a file names no base at all


def _rope_theta_sources(values):
    """{where: θ} for every place a config.json dict states RoPE's base: 4.56.2 reads top-level `rope_theta`;
    transformers 5 reads `rope_parameters["rope_theta"]`, or `rope_scaling`'s when that legacy dict is given (it
    replaces rope_parameters there), falling back to `rope_theta`."""
    sources = {}
    if values.get("rope_theta") is not None:
        sources["rope_theta"] = values["rope_theta"]
    for key in ("rope_parameters", "rope_scaling"):
        block = values.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ValueError(f"JetMoeConfig.{key} must be None or a dict, got {shown(block)}")
        rope_type = block.get("rope_type", block.get("type", "default"))
        unknown = sorted(set(block) - {"rope_type", "type", "rope_theta"})
        if rope_type != "default" or unknown:
            raise ValueError(f"JetMoeConfig.{key}={shown(block)} is not supported: only default RoPE (rope_type "
                             "'default', with at most rope_theta) is implemented")
        if block.get("rope_theta") is not None:
            sources[f"{key}.rope_theta"] = block["rope_theta"]
    return sources


def read_transformers5_keys(values):
    """A config.json dict as 4.56.2 or transformers 5 writes it -> our field names (docs/transformers.md).

    RoPE: θ may stand in `rope_theta` (4.56.2), `rope_parameters` (5.x) or `rope_scaling` (legacy); where more than
    one holds it they must agree, since 4.56.2 and 5.x would each believe a different one. `head_dim` is 5.x's alias
    of kv_channels (attribute_map); `partial_rotary_factor` (5.x rotates only part of each head) is refused."""
    values = dict(values)
    sources = _rope_theta_sources(values)
    stated_values = {repr(float(v)) if _is_real(v) else repr(v) for v in sources.values()}  # 500 is 500.0; nan is nan
    if len(stated_values) > 1:
        stated = ", ".join(f"{k}={shown(v)}" for k, v in sources.items())
        raise ValueError(f"config.json states RoPE's base twice with different values ({stated}): transformers "
                         "4.56.2 reads rope_theta, 5.x rope_parameters; which one is meant is ambiguous")
    values.pop("rope_parameters", None)  # written back from rope_theta by to_dict
    values["rope_theta"] = next(iter(sources.values()), DEFAULT_ROPE_THETA)
    if "head_dim" in values:
        head_dim = values.pop("head_dim")
        if "kv_channels" in values and values["kv_channels"] != head_dim:
            raise ValueError(f"config.json gives kv_channels={shown(values['kv_channels'])} and "
                             f"head_dim={shown(head_dim)}: transformers 5 reads head_dim as kv_channels, so they must "
                             "agree")
        values["kv_channels"] = head_dim
    factor = values.pop("partial_rotary_factor", None)
    if factor not in (None, 1, 1.0):
        raise ValueError(f"JetMoeConfig.partial_rotary_factor={shown(factor)} is not supported: JetMoE rotates whole "
                         "heads (transformers 5 would rotate only part of each)")
    return values


# Keys HF writes into config.json that carry no meaning for the math; kept so a round trip loses nothing.
_PASSTHROUGH_DEFAULTS = {"model_type": "jetmoe", "architectures": ["JetMoeForCausalLM"]}

# The original JetMoE code (github.com/myshell-ai/JetMoE, jetmoe/configuration_jetmoe.py) writes model_type "jetmoe"
# too, with three sizes under other names: from_dict reads either name (docs/semantics.md, "The original JetMoE code
# against HF and us"). HF's own JetMoeConfig would ignore them and use its defaults.
ORIGINAL_NAMES = {"moe_num_experts": "num_local_experts", "moe_top_k": "num_experts_per_tok",
                  "ffn_hidden_size": "intermediate_size"}
# The original's two architecture flags. HF's JetMoe, and so this reference, is the original with both true.
ORIGINAL_FLAGS = {"bias": "a learned bias added to each MLP mixture's output",
                  "glu": "gated (SwiGLU) MLP experts, whose input_linear holds 2F rows"}


def _read_original_names(values):
    # values: a config.json dict, changed in place: the original JetMoE's names renamed to ours, its flags checked
    # and dropped. ValueError where a file holds both names of one field with different values, or a flag not true.
    for original, ours in ORIGINAL_NAMES.items():
        if original not in values:
            continue
        value = values.pop(original)
        if ours in values and values[ours] != value:
            raise ValueError(f"config.json holds {original}={value!r} and {ours}={values[ours]!r}: {original} is the "
                             f"original JetMoE's name for {ours}, and the two disagree")
        values[ours] = value
    for flag, meaning in ORIGINAL_FLAGS.items():
        value = values.pop(flag, True)
        if value is not True:
            raise ValueError(f"config.json holds the original JetMoE's {flag}={value!r}: only {flag}=true ({meaning}) "
                             "is implemented, as in HF's JetMoe")


@dataclass
class JetMoeConfig:
    vocab_size: int = 32000  # V
    hidden_size: int = 2048  # D
    num_hidden_layers: int = 12  # L
    num_key_value_heads: int = 16  # H
    kv_channels: int = 128  # Dh
    intermediate_size: int = 5632  # F
    max_position_embeddings: int = 4096
    activation_function: str = "silu"
    num_local_experts: int = 8  # E
    num_experts_per_tok: int = 2  # K
    output_router_logits: bool = False
    aux_loss_coef: float = 0.01
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.01
    attention_dropout: float = 0.0
    num_labels: int = 2
    problem_type: str | None = None
    extra: dict = field(default_factory=dict)  # every other config.json key, written back unchanged

    def __post_init__(self):
        self.validate()

    @property
    def num_attention_heads(self):
        """K*H query heads: each of the K chosen attention experts owns H query heads (HF derives it the same way)."""
        return self.num_key_value_heads * self.num_experts_per_tok

    def validate(self):
        """ValueError naming the first field whose value has the wrong type or lies out of range: a config.json is
        untrusted input, so booleans must be JSON booleans, sizes and token ids integers, floats finite."""
        for name in SIZES:
            value = getattr(self, name)
            if not _is_int(value) or not 0 < value <= MAX_SIZE:
                raise ValueError(f"JetMoeConfig.{name} must be a positive integer, got {shown(value)}"
                                 + (f" (at most {MAX_SIZE})" if _is_int(value) and value > 0 else ""))
        if self.num_hidden_layers > MAX_LAYERS:
            raise ValueError(f"JetMoeConfig.num_hidden_layers={self.num_hidden_layers} is over {MAX_LAYERS}: not "
                             "a model this reference can hold")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"JetMoeConfig.num_experts_per_tok (top-k K={self.num_experts_per_tok}) must be <= "
                f"num_local_experts (E={self.num_local_experts})")
        if self.kv_channels % 2:
            raise ValueError(
                f"JetMoeConfig.kv_channels (Dh={self.kv_channels}) must be even: RoPE's rotate_half splits Dh in two")
        if self.activation_function != "silu":
            raise ValueError(f"JetMoeConfig.activation_function={shown(self.activation_function)} is not supported; "
                             "JetMoE's SwiGLU experts use 'silu'")
        for name in ("output_router_logits", "use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"JetMoeConfig.{name} must be true or false (a JSON boolean), got "
                                 f"{shown(getattr(self, name))}")
        for name in FLOATS:
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"JetMoeConfig.{name} must be a finite number, got {shown(value)}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"JetMoeConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.initializer_range < 0:
            raise ValueError(f"JetMoeConfig.initializer_range must be >= 0, got {self.initializer_range!r}")
        if not 0 <= self.attention_dropout <= 1:
            raise ValueError(f"JetMoeConfig.attention_dropout must be in [0, 1], got {self.attention_dropout!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"JetMoeConfig.rope_scaling must be None or a dict, got {shown(self.rope_scaling)}")
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type != "default":
                raise ValueError(f"JetMoeConfig.rope_scaling={shown(self.rope_scaling)} is not supported: "
                                 "only default RoPE (rope_scaling=None) is implemented")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            several = name == "eos_token_id" and isinstance(value, (list, tuple))  # HF allows several stop tokens
            for token_id in (value if several else [] if value is None else [value]):
                if not _is_int(token_id):
                    raise ValueError(f"JetMoeConfig.{name} must be None or an integer"
                                     f"{' or a list of integers' if name == 'eos_token_id' else ''}, got "
                                     f"{shown(value)}")
                if not 0 <= token_id < self.vocab_size:
                    raise ValueError(f"JetMoeConfig.{name}={shown(token_id)} is outside [0, {self.vocab_size})")
        if not _is_int(self.num_labels) or not 0 < self.num_labels <= MAX_SIZE:
            raise ValueError(f"JetMoeConfig.num_labels must be a positive integer, got {shown(self.num_labels)}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"JetMoeConfig.problem_type={shown(self.problem_type)} is not one of HF's problem types")

    @property
    def eos_token_ids(self):
        """eos_token_id as a list (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, values):
        values = read_transformers5_keys(dict(values))
        _read_original_names(values)
        names = {f.name for f in fields(cls)} - {"extra"}
        if "num_labels" not in values and "id2label" in values:
            values["num_labels"] = len(values["id2label"])  # HF stores num_labels only through id2label
        known = {k: values.pop(k) for k in list(values) if k in names}
        heads = values.pop("num_attention_heads", None)  # derived: K*H (a property here)
        config = cls(**known, extra=values)
        if heads is not None and heads != config.num_attention_heads:  # the original asserts it; HF would use it
            raise ValueError(f"config.json holds num_attention_heads={heads!r}, but JetMoE's query heads are "
                             f"num_key_value_heads * num_experts_per_tok = {config.num_attention_heads}")
        return config

    def to_dict(self):
        out = dict(_PASSTHROUGH_DEFAULTS)
        out.update(self.extra)
        for f in fields(self):
            if f.name not in ("extra", "num_labels"):
                out[f.name] = getattr(self, f.name)
        out["num_attention_heads"] = self.num_attention_heads
        # transformers 5 reads RoPE's base only from rope_parameters, 4.56.2 only from rope_theta: write both, equal
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if len(self.extra.get("id2label", {})) != self.num_labels:  # HF keeps num_labels as len(id2label)
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return out

    @classmethod
    def from_pretrained(cls, path):
        """A model directory's config.json (or a config.json path), read through reference/io/files.py's guards."""
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{path!r} does not exist: expected a model directory or a config.json")
        config_path = inside(path, "config.json") if os.path.isdir(path) else path
        if not os.path.lexists(config_path):
            raise FileNotFoundError(f"no config.json at {config_path!r}")
        values = read_json_object(config_path, "config")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:  # a value of the wrong type or out of range (validate)
            raise ValueError(f"{config_path}: {e}") from None

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

"""JetMoE hyper-parameters: the same fields, defaults and config.json format as HF's `JetMoeConfig`.

The letters after each size field are the shape legend's (reference/__init__.py).

Notebook: notebooks/05_the_whole_model.ipynb.
"""

import json
import math
import os
from dataclasses import dataclass, field, fields

from .files import inside, read_json_object, shown


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


# Keys HF writes into config.json that carry no meaning for the math; kept so a round trip loses nothing.
_PASSTHROUGH_DEFAULTS = {"model_type": "jetmoe", "architectures": ["JetMoeForCausalLM"]}


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
        values = dict(values)
        names = {f.name for f in fields(cls)} - {"extra"}
        if "num_labels" not in values and "id2label" in values:
            values["num_labels"] = len(values["id2label"])  # HF stores num_labels only through id2label
        known = {k: values.pop(k) for k in list(values) if k in names}
        values.pop("num_attention_heads", None)  # derived, never an input (HF recomputes it too)
        return cls(**known, extra=values)

    def to_dict(self):
        out = dict(_PASSTHROUGH_DEFAULTS)
        out.update(self.extra)
        for f in fields(self):
            if f.name not in ("extra", "num_labels"):
                out[f.name] = getattr(self, f.name)
        out["num_attention_heads"] = self.num_attention_heads
        if len(self.extra.get("id2label", {})) != self.num_labels:  # HF keeps num_labels as len(id2label)
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return out

    @classmethod
    def from_pretrained(cls, path):
        """A model directory's config.json (or a config.json path), read through reference/files.py's guards."""
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

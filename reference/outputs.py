"""What a forward returns: HF's output dataclasses, field for field (transformers.modeling_outputs).

Shapes: the legend in reference/__init__.py. Shared with the GPU twin, whose fields hold CuPy arrays.

Notebook: notebooks/05_the_whole_model.ipynb.
"""

from dataclasses import dataclass

import numpy as np

from .cache import KVCache


@dataclass
class MoeModelOutputWithPast:
    last_hidden_state: np.ndarray  # [B, T, D]
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None  # L+1 x [B, T, D]; the last one is after the final norm, as HF
    attentions: tuple | None = None  # L x [B, K*H, T, S]
    router_logits: tuple | None = None  # 2L x [N, E]: layer i's attention router, then its MLP router


@dataclass
class MoeCausalLMOutputWithPast:
    loss: np.ndarray | None = None
    aux_loss: np.ndarray | None = None
    logits: np.ndarray | None = None  # [B, T_kept, V]
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    router_logits: tuple | None = None


@dataclass
class SequenceClassifierOutputWithPast:
    loss: np.ndarray | None = None
    logits: np.ndarray | None = None  # [B, num_labels], pooled at the last non-pad token
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None

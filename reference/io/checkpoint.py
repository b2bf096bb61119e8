"""Hugging Face checkpoints: config.json + model.safetensors (or shards listed in model.safetensors.index.json).

Tensors keep HF's key names. Files are read and written by reference/io/safetensors.py, memory-mapped: a tensor
whose dtype already matches the requested one is a read-only view of the file, never a copy. Every error names the
tensor (or file) at fault.  Shapes: reference/__init__.py.

Notebook: notebooks/05_the_whole_model.ipynb.
"""

import os

import numpy as np

from . import files
from .. import names
from ..config import JetMoeConfig
from .mapped import MEMORY_FRACTION, MappedWeight, available_memory, convert
from .safetensors import BF16, SafetensorsError, read_safetensors, write_safetensors

SUPPORTED_MODEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
HEAD_TENSORS = {head: tuple(t.name() for t in rows) for head, rows in names.HEAD_TENSORS.items()}  # head -> names


class Pretrained:
    """from_pretrained / from_random / save_pretrained, shared by the three model classes of reference/hf_classes.py.
    A subclass names its head ("base", "causal_lm", "sequence_classification") and takes
    (config, base tensors, head tensors)."""

    head = "base"

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32, max_memory=None, progress=None, finite=True):
        """max_memory: bytes the converted weights may take (default: reference.io.mapped.MEMORY_FRACTION of the
        available memory); past it the big matrices stay in the file. progress(done, total, unit): conversion.
        finite: refuse weights holding NaN or inf (check_finite); False loads them as they are."""
        config = JetMoeConfig.from_pretrained(path)
        base, head = select_tensors(read_checkpoint_tensors(path), config, cls.head, dtype, max_memory, progress)
        if finite:
            check_finite({**base, **head})
        return cls(config, base, head)

    @classmethod
    def from_random(cls, config, seed=0, std=0.1, dtype=np.float32):
        """A model with every parameter random (biases and norm weights too): for tests, notebooks, benches."""
        tensors = random_parameters(config, cls.head, np.random.default_rng(seed), std, model_dtype(dtype))
        base, head = select_tensors(tensors, config, cls.head, dtype)
        return cls(config, base, head)

    @classmethod
    def from_init(cls, config, seed=0, dtype=np.float32):
        """A freshly initialised model, to train from scratch: HF's JetMoePreTrainedModel._init_weights
        (initial_parameters)."""
        tensors = initial_parameters(config, cls.head, np.random.default_rng(seed), model_dtype(dtype))
        base, head = select_tensors(tensors, config, cls.head, dtype)
        return cls(config, base, head)

    def save_pretrained(self, path):
        write_checkpoint(path, self.config, self.state_dict())

    def load_state_dict(self, state):
        """Make state (names as state_dict() gives them) the model's parameters, validated as a checkpoint is;
        arrays already in the model's dtype are used as given, not copied (reference.AdamW relies on it)."""
        base, head = select_tensors(state, self.config, self.head, self.dtype)
        self.__init__(self.config, base, head)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or tensor and what is wrong."""


def model_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_MODEL_DTYPES:
        raise TypeError(f"dtype={dtype} is not supported by the reference: use np.float32 (default) or np.float64")
    return dtype


def base_parameter_shapes(config):
    """HF name (without prefix) -> shape for JetMoeModel, from reference/names.py's table."""
    shapes = {t.name(): t.dims(config) for t in names.BASE_TENSORS}
    for i in range(config.num_hidden_layers):
        shapes.update({t.name(i): t.dims(config) for t in names.BLOCK_TENSORS})
    return shapes


def head_parameter_shapes(config, head):
    """HF name -> shape of the tensors a head adds on top of the base model."""
    return {t.name(): t.dims(config) for t in names.HEAD_TENSORS[head]}


def all_parameter_shapes(config, head):
    """HF name (base names without prefix) -> shape, for the base model plus `head`'s tensors; a tied lm_head is
    listed too (HF re-ties it to embed_tokens on load)."""
    return {**base_parameter_shapes(config), **head_parameter_shapes(config, head)}


def is_norm_weight(name):
    """True for an RMSNorm weight (input_layernorm, post_attention_layernorm, the final norm): HF inits them to 1."""
    return name.endswith("norm.weight")


def read_checkpoint_tensors(path):
    """All tensors of an HF model directory: model.safetensors, or the shards its index lists; every failure a
    CheckpointError naming the file (reference/io/files.py's and reference/io/safetensors.py's refusals included)."""
    try:
        return _read_checkpoint_tensors(path)
    except (files.FileError, SafetensorsError) as error:
        raise CheckpointError(str(error)) from None


def _read_checkpoint_tensors(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    single, index = (files.inside(path, name) for name in ("model.safetensors", "model.safetensors.index.json"))
    if files.present(single):
        return read_safetensors(single)
    if not files.present(index):
        raise FileNotFoundError(f"{path!r} has neither model.safetensors nor model.safetensors.index.json")
    values = files.read_json(index, "index")
    weight_map = values.get("weight_map") if isinstance(values, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (it needs a weight_map object)")
    by_shard = {}  # shard -> the names the index puts there, in one pass (60,000 shards must not take minutes)
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names, got "
                                  f"{files.shown(name)}: {files.shown(shard)}")
        by_shard.setdefault(shard, []).append(name)
    tensors = {}
    for shard, shard_names in sorted(by_shard.items()):
        shard_path = files.inside(path, shard)
        if not files.present(shard_path):
            raise CheckpointError(f"{index} lists shard {files.shown(shard)}, which is missing")
        shard_tensors = read_safetensors(shard_path)
        for name in shard_names:
            if name not in shard_tensors:
                raise CheckpointError(f"{index} puts tensor {files.shown(name)} in {files.shown(shard)}, which does "
                                      "not contain it")
            tensors[name] = shard_tensors[name]
    return tensors


def _strip_base_prefix(tensors):
    """Map base-model tensors to prefix-free names, whichever of names.BASE_PREFIXES the checkpoint used."""
    out = {}
    for name, value in tensors.items():
        for prefix in names.BASE_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = value
    return out


def select_tensors(tensors, config, head, dtype, max_memory=None, progress=None):
    """Validate raw checkpoint tensors for `head` and bring them to `dtype` (see `place`).

    Returns (base tensors by prefix-free name, head tensors by name). Missing, unexpected and mis-shaped
    tensors are errors that name every offender. A base model ignores a head's tensors, as HF does when a
    JetMoeModel loads a CausalLM checkpoint; a tied lm_head is taken from embed_tokens.
    """
    dtype = model_dtype(dtype)
    tensors = _strip_base_prefix(tensors)
    expected = all_parameter_shapes(config, head)
    tied = head == "causal_lm" and config.tie_word_embeddings
    ignorable = {n for h in HEAD_TENSORS.values() for n in h} - set(HEAD_TENSORS[head])
    if tied:
        ignorable.add("lm_head.weight")  # HF drops it on save and re-ties it on load
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - ignorable)
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}"
                              + (" ..." if len(unexpected) > 8 else ""))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(tensors[name].shape)} in the checkpoint, "
                                  f"the config needs {list(shape)}")
        if not np.issubdtype(tensors[name].dtype, np.floating) and tensors[name].dtype != BF16:
            raise CheckpointError(f"tensor {name!r} has non-float dtype {tensors[name].dtype}")
    converted = place({name: tensors[name] for name in expected}, dtype, max_memory, progress)
    if tied:
        converted["lm_head.weight"] = converted["embed_tokens.weight"]
    head_names = set(head_parameter_shapes(config, head))
    base = {n: t for n, t in converted.items() if n not in head_names}
    return base, {n: t for n, t in converted.items() if n in head_names}


def first_non_finite(array, block=1 << 20):
    # array: [...] floating -> the index (a tuple) of its first NaN or inf in C order, or None; read `block`
    # elements at a time, so no mask as large as the array is made
    flat = array.reshape(-1)
    for start in range(0, flat.size, block):
        part = np.isfinite(flat[start:start + block])
        if not part.all():
            return tuple(int(i) for i in np.unravel_index(start + int(np.argmin(part)), array.shape))
    return None


def check_finite(tensors):
    """CheckpointError naming the first tensor (and index) holding NaN or inf: a model computing with it would
    give NaN text or loss without a word. One pass over each tensor in memory, once, at load; a MappedWeight
    (left in the file) is not read here: the tools check the logits it reaches (jetmoe/finite.py)."""
    for name, tensor in tensors.items():
        if isinstance(tensor, np.ndarray) and (where := first_non_finite(tensor)) is not None:
            raise CheckpointError(f"tensor {name!r} holds {tensor[where]} at index {list(where)}: a checkpoint's "
                                  "weights must be finite")


def is_small(name):
    """Norms, biases and routers (reference/names.py's float32 rows): converted at load whatever the budget (routers
    decide which experts run)."""
    return names.tensor_of(name).float32


def place(tensors, dtype, max_memory=None, progress=None):
    """name -> tensor in `dtype`: a view of the file where its dtype already is `dtype`; else converted now when
    all conversions fit `max_memory` bytes (default MEMORY_FRACTION of the available memory), else converted now
    only if small and otherwise a MappedWeight that converts what the forward reads (reference/io/mapped.py).
    progress(done, total, unit) is called as bytes are converted. A model that does not fit even so is an error
    before any work starts."""
    to_convert = {n for n, t in tensors.items() if t.dtype != dtype}
    needed = sum(tensors[n].size for n in to_convert) * dtype.itemsize
    available = available_memory()
    if max_memory is None:
        max_memory = MEMORY_FRACTION * available if available is not None else float("inf")
    if needed > max_memory:
        to_convert = {n for n in to_convert if is_small(n)}
        needed = sum(tensors[n].size for n in to_convert) * dtype.itemsize
        limit = max_memory if available is None else min(max_memory, available)
        if needed > limit:
            raise CheckpointError(f"the model does not fit: even with its matrices left in the file it needs "
                                  f"{needed / 2**30:.2f} GiB of converted tensors, and {limit / 2**30:.2f} GiB "
                                  "are available (max_memory or the free memory)")
    out, done = {}, 0
    for name, tensor in tensors.items():
        if tensor.dtype == dtype:
            out[name] = tensor
        elif name in to_convert:
            out[name] = convert(tensor, np.empty(tensor.shape, dtype))
            done += out[name].nbytes
            if progress is not None:
                progress(done, needed, "B")
        else:
            out[name] = MappedWeight(tensor, dtype)
    return out


def write_checkpoint(path, config, tensors):
    """Write config.json and model.safetensors (HF names, HF's 'pt' format tag) so transformers can load them."""
    config.save_pretrained(path)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})


def initial_parameters(config, head, rng, dtype=np.float32):
    """HF's JetMoePreTrainedModel._init_weights: every matrix (nn.Linear, nn.Embedding, JetMoeParallelExperts)
    ~ Normal(0, initializer_range), the embedding's padding_idx row zero, RMSNorm weights 1, the MoA and MoE output
    biases 0. A tied lm_head is the embedding itself, so it gets no tensor of its own."""
    shapes = all_parameter_shapes(config, head)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    out = {}
    for name, shape in shapes.items():
        if is_norm_weight(name):
            out[name] = np.ones(shape, dtype)
        elif name.endswith(".bias"):
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = (rng.standard_normal(shape) * config.initializer_range).astype(dtype)
    if config.pad_token_id is not None:
        out["embed_tokens.weight"][config.pad_token_id] = 0
    return out


def random_parameters(config, head, rng, std=0.1, dtype=np.float64):
    """Random tensors with every parameter non-trivial (biases != 0, norm weights != 1): for tests and benches."""
    out = {}
    for name, shape in all_parameter_shapes(config, head).items():
        if is_norm_weight(name):
            out[name] = rng.uniform(0.5, 1.5, size=shape).astype(dtype)
        else:
            out[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return out

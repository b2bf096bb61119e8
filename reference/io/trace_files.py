"""Trace files: a Trace (name -> array, in forward order) on disk, as safetensors, and the checks a trace file a
port wrote must pass before the debugger uses it.

  Trace             name -> array in forward order; .save(path) / Trace.load(path)
  TraceWriter       a trace handler writing each tensor as the forward goes (memory: one tensor at a time)
  load_with_metadata, check_trace_file   a trace file is untrusted input (docs/security.md)

The file is plain safetensors (reference/io/safetensors.py); its metadata's "order" keeps the forward order. Names
of generate's decode steps start with step_prefix(i). Notebook: notebooks/07_debugging_a_port.ipynb.
"""

import math
import os

import numpy as np

from .files import shown
from ..inputs import to_numpy
from .mapped import available_memory
from .safetensors import BF16, StagedFile, Writer, code_of, read_safetensors


def step_prefix(step):
    """The names of generate's forward number `step` start with this: "" for the prefill (0), "step.{i}." for
    decode step i."""
    return f"step.{step}." if step else ""


class Trace(dict):
    """name -> array, in the order the forward produced them (a dict keeps insertion order)."""

    def save(self, path, metadata=None):
        """Write the trace to safetensors so another runtime can be compared offline (see TraceWriter)."""
        with TraceWriter(path, metadata) as writer:
            for name, value in self.items():
                writer.add(name, value)

    @classmethod
    def load(cls, path):
        """A saved trace, in forward order when the file records it (a port's own file may not: then by name)."""
        return cls(load_with_metadata(path)[0])


def load_with_metadata(path):
    """(Trace, metadata {str: str}) of a safetensors trace file: untrusted input, read as a checkpoint is
    (reference/io/safetensors.py: a regular file, its header checked as strictly as the safetensors library does), its
    tensors memory-mapped and read-only, so a large file costs no memory until a tensor is used."""
    tensors, metadata = read_safetensors(os.fspath(path), with_metadata=True)
    order = metadata.get("order", "")
    names = [n for n in order.split(",") if n in tensors] if order else []
    known = set(names)
    return Trace([(n, tensors[n]) for n in names] + [(n, t) for n, t in tensors.items() if n not in known]), metadata


class TraceWriter(StagedFile):
    """A handler that writes each traced tensor to a safetensors file as the forward produces it.

    A safetensors header (names, shapes, offsets) comes before the data and is known only at the end, so tensors
    go to a spool file beside `path` as they come; close() writes the file through reference/io/safetensors.py's
    Writer, each tensor read back from the spool. Memory holds one tensor at a time, whatever the model's size.
    The forward order goes into the header's metadata ("order": the names, comma-separated), beside the caller's
    `metadata`.

        with TraceWriter("trace.safetensors", {"dtype": "float32"}) as writer, handling(writer):
            model(...)
    """

    def __init__(self, path, metadata=None):
        self.path, self.metadata = os.fspath(path), dict(metadata or {})
        self._spool_path = self.path + ".part"
        self._spool = open(self._spool_path, "wb")  # OSError here names the unwritable path, before any work
        self._specs = {}  # name -> (dtype, shape), in forward order

    def add(self, name, value):
        if name in self._specs:
            raise ValueError(f"trace point {name} was recorded twice")
        array = np.ascontiguousarray(to_numpy(value))
        code_of(self.path, name, array.dtype)  # a dtype the format cannot hold is refused before it is spooled
        self._spool.write(array.reshape(-1).view(np.uint8))
        self._specs[name] = (array.dtype, array.shape)

    def __call__(self, name, value, frame):
        self.add(name, value)
        return value

    def __len__(self):
        return len(self._specs)

    def close(self):
        self._spool.close()
        spool = np.memmap(self._spool_path, np.uint8, mode="r") if os.path.getsize(self._spool_path) else None
        specs = [(name, dtype, shape) for name, (dtype, shape) in self._specs.items()]
        with Writer(self.path, specs, {**self.metadata, "order": ",".join(self._specs)}) as writer:
            offset = 0
            for name, dtype, shape in specs:  # each tensor a view of the spool: copied by the kernel, not in memory
                size = math.prod(shape) * dtype.itemsize
                writer.write(name, spool[offset:offset + size].view(dtype).reshape(shape) if size else
                             np.zeros(shape, dtype))
                offset += size
        del spool
        os.remove(self._spool_path)

    def discard(self):
        self._spool.close()
        os.remove(self._spool_path)


TRACE_FLOATS = ("bfloat16", "float32", "float64")  # the dtypes a trace is compared in, least precise first
MAX_POSITION = 2**31 - 1


def check_trace_file(trace, metadata, config, label, itemsize=8, available=None):
    """ValueError, before any work, where a trace file (a Trace and its metadata) does not fit the model `config`:
    float tensors other than bfloat16/float32/float64, inputs.* that are not [B, T] integers of the right shapes,
    token ids outside the vocabulary, more tokens than max_position_embeddings, routing indices outside [0, E), or
    a forward whose activations, `itemsize` bytes a number, would not fit `available` bytes (default: the memory
    available now)."""
    dtype = metadata.get("dtype")
    if dtype is not None and dtype not in TRACE_FLOATS:
        raise ValueError(f"{label}: its metadata says dtype {shown(dtype)}; a trace is compared in "
                         f"{', '.join(TRACE_FLOATS)}")
    for name, value in trace.items():
        kind = np.dtype(value.dtype)
        if kind.kind == "f" or kind == BF16:
            if kind.name not in TRACE_FLOATS:
                raise ValueError(f"{label}: tensor {shown(name)} is {kind.name}; a trace holds "
                                 f"{', '.join(TRACE_FLOATS)} floats (cast it to float32)")
        elif kind.kind not in "iub":
            raise ValueError(f"{label}: tensor {shown(name)} has dtype {kind.name}, neither float nor integer")
        if name.endswith("router.top_k_indices"):
            _check_ids(label, name, value, config.num_local_experts, 2)
            if value.shape[1] != config.num_experts_per_tok:
                raise ValueError(f"{label}: {name} has shape {list(value.shape)}, the model chooses "
                                 f"K={config.num_experts_per_tok} experts per token")
    step, batch, tokens = 0, None, 0
    while (prefix := step_prefix(step)) + "inputs.input_ids" in trace:
        ids = _check_ids(label, prefix + "inputs.input_ids", trace[prefix + "inputs.input_ids"], config.vocab_size, 2)
        batch = ids.shape[0] if batch is None else batch
        expected = (batch, ids.shape[1] if step == 0 else 1)
        if ids.shape != expected:
            raise ValueError(f"{label}: {prefix}inputs.input_ids has shape {list(ids.shape)}, expected "
                             f"{list(expected)}")
        tokens += ids.shape[1]
        for name, high, shape in (("attention_mask", 2, (batch, tokens)), ("position_ids", MAX_POSITION,
                                                                           expected)):
            if prefix + "inputs." + name in trace:
                value = _check_ids(label, prefix + "inputs." + name, trace[prefix + "inputs." + name], high, 2)
                if value.shape != shape:
                    raise ValueError(f"{label}: {prefix}inputs.{name} has shape {list(value.shape)}, expected "
                                     f"{list(shape)}")
        step += 1
    if tokens > config.max_position_embeddings:
        raise ValueError(f"{label} runs on {tokens} tokens, more than max_position_embeddings="
                         f"{config.max_position_embeddings} of the model")
    needed = activation_bytes(config, batch or 0, tokens, itemsize)
    available = available if available is not None else available_memory()
    if available is not None and needed > available:
        raise ValueError(f"{label}: a trace of its {batch} x {tokens} tokens needs about {needed / 2**30:.1f} GiB of "
                         f"activations, more than the {available / 2**30:.1f} GiB available")


def activation_bytes(config, batch, tokens, itemsize):
    """A bound on the bytes a captured forward over [batch, tokens] keeps, `itemsize` bytes a number: per layer the
    attention probs [B, K*H, T, T], a dozen [B, T, D] tensors and the experts' [N, K, 3F]; then the logits [B, T, V]."""
    K, H, D, F = (config.num_experts_per_tok, config.num_key_value_heads, config.hidden_size,
                  config.intermediate_size)
    per_layer = batch * tokens * (K * H * tokens + 12 * D + 3 * K * F + 2 * config.num_local_experts)
    return itemsize * (config.num_hidden_layers * per_layer + batch * tokens * config.vocab_size)


def _check_ids(label, name, value, high, ndim):
    # value: an integer tensor of `ndim` dimensions, each entry in [0, high) -> value; ValueError naming it otherwise
    value = np.asarray(value)
    if value.ndim != ndim or not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
        raise ValueError(f"{label}: {name} must be a {ndim}-D integer tensor, got shape {list(value.shape)} "
                         f"{value.dtype}")
    if value.size and (int(value.min()) < 0 or int(value.max()) >= high):
        bad = int(value.min()) if int(value.min()) < 0 else int(value.max())
        raise ValueError(f"{label}: {name} holds {bad}, outside [0, {high})")
    return value

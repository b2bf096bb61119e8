"""One CUDA graph per decode step: generate's forward captured once and replayed for every new token.

No reference twin: this is about how the GPU launches the same math, not what it computes.  Shapes:
reference/__init__.py.

Eager decoding on the GPU launches about 30 kernels per layer from Python, and every op allocates its outputs,
so at batch 1 the launch overhead dwarfs the ~microseconds each kernel runs. A CUDA graph replays the whole
step with one launch. Three things make the step capturable:
  - its inputs live in device buffers that outlive the graph: input_ids [B, 1] and position_ids [B, 1], copied
    into before each replay (B int64s each), and the attention mask [B, capacity], whose new column the step
    itself marks present on the device (StaticKVCache.begin_step);
  - the KV cache is a gpu.cache.StaticKVCache: fixed capacity, its write position and key count on the device,
    advanced by the step itself, and attention reads `num_keys` from the device;
  - every device allocation of the step comes from a BufferPlan (below): recorded on an eager run of the same
    step, then handed out again, in the same order, while capturing. Capture never calls cudaMalloc, and each
    replay writes the same buffers the graph was captured with.
Nothing in the step syncs with the host: shapes (and so every launch size and kernel choice) are fixed for a
(batch, capacity), which is what a GraphDecoder is made for.

CapturedStep drives the phases: call 1 runs the step eagerly as is (it compiles the kernels and fills every
lazily made device constant, such as RoPE's inverse frequencies and the cache's position buffer), call 2 runs it
eagerly again through a recording plan, call 3 captures it through the replaying plan and launches the graph,
and later calls only launch. Its host logic is checked on the CPU by tests/gpu/host/test_graph_host.py with a
fake CuPy; tests/gpu/device/test_model.py checks on a GPU that graphed generation equals eager generation
bit for bit.

Results are bitwise those of the same step uncaptured: the same kernels run with the same arguments. Against
generate(graph=False), which attends over a growing gpu.cache.KVCache, they are bitwise equal while prompt + new
tokens fit one decode key split (128 keys: gpu.attention.decode_split plans it from the number of keys it is
given, here the whole capacity, there the keys so far); beyond, the keys may be summed in other chunks and the
logits differ in their last float32 bits (tests/gpu/device/test_model.py checks both). The prompt's
prefill stays uncaptured (its length varies), and so do tracing (trace handlers are Python) and model(...)
calls. Sampling works unchanged: the graph leaves the last logits [B, V] in a plan buffer, which generate copies
to the host.
"""

import numpy as np

from reference.generation import cached_forward
from reference.inputs import check_inputs, int_array
from reference.io import trace

from .cache import StaticKVCache
from .device import require_cupy
from .linear import embed, linear

__all__ = ["BufferPlan", "PlanMismatch", "CapturedStep", "GraphDecoder", "check_step", "graph_stepper"]


_HINT = "; generate(..., graph=False) decodes without a graph"


class PlanMismatch(RuntimeError):
    """The captured step asked for other allocations than the recorded one: it would not replay correctly."""


class BufferPlan:
    """Every device allocation of one step, in order: recorded once, then served again without allocating.

    An allocator for cupy.cuda.using_allocator: `allocate(size)` -> a cupy MemoryPointer. While recording it
    takes memory from `malloc` (the CuPy pool's) and keeps it, so no buffer of the step is ever freed or reused
    by anyone else; while replaying it returns the recorded pointers in the same order, checking each size.
    """

    def __init__(self, malloc):
        self._malloc = malloc
        self.sizes, self._memory = [], []  # bytes and MemoryPointer of each allocation, in request order
        self.replaying, self._next = False, 0

    def allocate(self, size):
        if not self.replaying:
            memory = self._malloc(size)
            self.sizes.append(size)
            self._memory.append(memory)
            return memory
        if self._next >= len(self.sizes):
            raise PlanMismatch(f"the captured step allocated more than the {len(self.sizes)} buffers recorded "
                               f"for it: a device allocation depends on state that changed between the runs{_HINT}")
        if self.sizes[self._next] != size:
            raise PlanMismatch(f"allocation {self._next} of the captured step is {size} bytes, the recorded one "
                               f"{self.sizes[self._next]}: the step's buffers differ between its runs{_HINT}")
        memory = self._memory[self._next]
        self._next += 1
        return memory

    def start_replay(self):
        self.replaying, self._next = True, 0

    def finish_replay(self):
        if self._next != len(self.sizes):
            raise PlanMismatch(f"the captured step used {self._next} of the {len(self.sizes)} recorded "
                               f"buffers{_HINT}")


class CapturedStep:
    """`run(step)` -> the result of `step()`: twice eagerly (warm-up, then recording the plan), then captured once
    into a CUDA graph on `stream` and replayed. `step` is the same function every call (it is passed in, not kept,
    so that a step bound to its owner makes no reference cycle) and reads and writes only buffers that outlive it."""

    def __init__(self, cp, stream):
        self._cp, self.stream = cp, stream
        self.plan = BufferPlan(cp.get_default_memory_pool().malloc)
        self.calls, self.graph, self._result = 0, None, None

    def run(self, step):
        cp = self._cp
        self.calls += 1
        with self.stream:
            if self.calls == 1:
                return step()
            if self.calls == 2:
                with cp.cuda.using_allocator(self.plan.allocate):
                    return step()
            if self.graph is None:
                self.plan.start_replay()
                with cp.cuda.using_allocator(self.plan.allocate):
                    self.stream.begin_capture()
                    try:
                        self._result = step()
                    except BaseException:
                        self._end_broken_capture()
                        raise
                    graph = self.stream.end_capture()
                self.plan.finish_replay()
                self.graph = graph
            self.graph.launch(self.stream)
            return self._result

    def _end_broken_capture(self):
        # the step failed while capturing: end the capture so the stream is usable again; the step's own error is
        # the one to report, and ending an invalidated capture raises one of its own
        try:
            self.stream.end_capture()
        except Exception:  # superseded by the step's error, which the caller re-raises
            pass


def check_step(config, batch, capacity, seen, step_ids, mask, positions):
    # step_ids, positions: [B, T], mask: [B, S = seen + T] host ints -> int64 [B, T], [B, S], [B, T]
    # A GraphDecoder's inputs get model(...)'s checks (reference.inputs.check_inputs) on the host, since its device
    # step has none, plus what the captured step assumes: one token a step within the capacity, its mask column 1.
    step_ids, _, _, positions, _ = check_inputs(config, step_ids, None, None, positions, None, None)
    tokens = step_ids.shape[1]
    if step_ids.shape[0] != batch:
        raise ValueError(f"this GraphDecoder runs batch {batch}, the input has batch {step_ids.shape[0]}")
    mask = int_array("attention_mask", mask, 2)
    if mask.shape != (batch, seen + tokens):
        raise ValueError(f"attention_mask has shape {mask.shape}, expected (B, cached + new tokens) = "
                         f"{(batch, seen + tokens)}")
    if seen + tokens > capacity:
        raise ValueError(f"{seen} cached + {tokens} new tokens exceed the capacity {capacity}")
    if seen and (tokens != 1 or not (mask[:, -1] == 1).all()):
        raise ValueError("a captured decode step takes one token per row, present in the attention_mask "
                         f"(got {tokens} tokens, last mask column {mask[:, -1].tolist()})")
    return step_ids, mask, np.broadcast_to(positions, (batch, tokens))


class GraphDecoder:
    """generate's step for the GPU model (reference.generation.generate(stepper=...)): the prompt eagerly through
    a StaticKVCache, then each new token by one CapturedStep. Made for one (batch, capacity)."""

    def __init__(self, model, batch, capacity):
        cp = require_cupy()
        self._cp, self.model, self.batch, self.capacity = cp, model, batch, capacity
        self.cache = StaticKVCache.for_config(model.config, batch, model.dtype, capacity=capacity)
        self.attention_mask = cp.zeros((batch, capacity), cp.int64)  # [B, capacity]: 1 where a key is present
        self.input_ids = cp.zeros((batch, 1), cp.int64)  # [B, 1] the decode step's input buffers
        self.position_ids = cp.zeros((batch, 1), cp.int64)
        self.decode = CapturedStep(cp, cp.cuda.Stream(non_blocking=True))
        self.seen = 0  # tokens run so far (host count; the device's is the cache's offsets)
        cp.cuda.Device().synchronize()  # the buffers were zeroed on the default stream; `stream` does not wait

    def _forward(self, input_ids, position_ids, attention_mask_to_mark):
        # input_ids, position_ids: [B, T] device int64 -> last-token logits [B, V]
        tokens = input_ids.shape[1]
        cache_position = self.cache.begin_step(tokens, attention_mask=attention_mask_to_mark)  # [T]
        inner = self.model.model
        h = embed(inner.embed_tokens, input_ids)  # [B, T, D]
        h = inner.decoder(h, position_ids, cache_position, self.attention_mask, self.cache)[0]
        return linear(h[:, -1], self.model.lm_head)  # [B, V]: only the last token's logits are needed

    def _decode_step(self):
        return self._forward(self.input_ids, self.position_ids, self.attention_mask)

    def __call__(self, step_ids, mask, positions):
        # step_ids, positions: [B, T] host ints, mask: [B, S] host ints (generate's) -> logits [B, V] on the device
        cp, stream = self._cp, self.decode.stream
        step_ids, mask, positions = check_step(self.model.config, self.batch, self.capacity, self.seen, step_ids,
                                               mask, positions)
        with stream:
            if not self.seen:  # the prompt: eager, any length
                self.attention_mask[:, :mask.shape[1]] = cp.asarray(mask)  # its padding stays; nothing to mark
                logits = self._forward(cp.asarray(step_ids), cp.asarray(positions), None)
            else:
                self.input_ids.set(np.ascontiguousarray(step_ids), stream)
                self.position_ids.set(np.ascontiguousarray(positions), stream)
                logits = self.decode.run(self._decode_step)  # marks the new mask column on the device
        self.seen += step_ids.shape[1]
        stream.synchronize()  # generate reads the logits on the default stream next
        return logits


def graph_stepper(model, batch, capacity):
    """The stepper gpu generate uses: a GraphDecoder, or the uncaptured cached_forward while tracing (trace
    handlers are Python and cannot run inside a graph)."""
    if trace.tracing():
        return cached_forward(model, batch, capacity)
    return GraphDecoder(model, batch, capacity)

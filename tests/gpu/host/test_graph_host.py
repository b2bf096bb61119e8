"""Host logic of gpu/graph.py on the CPU, with a fake CuPy: the buffer plan and the phases of a captured step.

What a CUDA graph needs from the host: the captured run allocates nothing (every buffer comes from the plan
recorded on the eager run, in the same order and sizes), a mismatch is an error rather than a replay that writes
the wrong buffers, a failed capture leaves the stream usable, and replays launch the graph without running the
Python step again. The device side (graphed generation equal to eager, bit for bit) is
tests/gpu/device/test_model.py.
"""

import contextlib
import itertools

import numpy as np
import pytest

from gpu.graph import BufferPlan, CapturedStep, PlanMismatch, check_step, graph_stepper
from reference.io import trace


class FakePool:
    """The CuPy pool's malloc: every call is a fresh buffer, logged."""

    def __init__(self):
        self.calls = []
        self._ids = itertools.count()

    def malloc(self, size):
        self.calls.append(size)
        return ("memory", next(self._ids), size)


class FakeGraph:
    def __init__(self):
        self.launches = 0

    def launch(self, stream):
        self.launches += 1


class FakeStream:
    def __init__(self):
        self.capturing, self.graphs, self.ended = False, [], 0

    def __enter__(self):
        return self

    def __exit__(self, *error):
        return False

    def begin_capture(self):
        assert not self.capturing, "capture begun twice"
        self.capturing = True

    def end_capture(self):
        assert self.capturing, "capture ended without one"
        self.capturing, self.ended = False, self.ended + 1
        self.graphs.append(FakeGraph())
        return self.graphs[-1]


class FakeCupy:
    """Just what CapturedStep touches: the default pool and using_allocator (what every array allocation calls)."""

    def __init__(self):
        self.pool = FakePool()
        self.allocator = self.pool.malloc
        fake = self

        class Cuda:
            @staticmethod
            @contextlib.contextmanager
            def using_allocator(allocator):
                former, fake.allocator = fake.allocator, allocator
                try:
                    yield
                finally:
                    fake.allocator = former

        self.cuda = Cuda

    def get_default_memory_pool(self):
        return self.pool

    def empty(self, size):
        return self.allocator(size)


def allocating_step(cp, sizes_of_call):
    """A step that allocates sizes_of_call(i) on its i-th run (as the ops of a forward do) and returns the last."""
    runs = itertools.count(1)

    def step():
        return [cp.empty(size) for size in sizes_of_call(next(runs))][-1]

    return step


def test_phases_warm_up_record_capture_then_replay():
    cp, stream = FakeCupy(), FakeStream()
    sizes = [np.random.default_rng().integers(1, 1 << 20) for _ in range(5)]
    step = allocating_step(cp, lambda i: sizes)
    captured = CapturedStep(cp, stream)
    captured.run(step)  # warm-up: the step's own allocations, not planned
    assert cp.pool.calls == sizes and captured.plan.sizes == []
    recorded = captured.run(step)  # recording: the same sizes, now kept by the plan
    assert captured.plan.sizes == sizes and cp.pool.calls == sizes * 2
    result = captured.run(step)  # capture: served from the plan, the pool is never called
    assert cp.pool.calls == sizes * 2, "the captured run allocated"
    assert result == recorded, "the capture must reuse the recorded buffers, in order"
    assert stream.ended == 1 and stream.graphs[0].launches == 1 and not stream.capturing
    for replay in range(2, 6):
        assert captured.run(step) == result
        assert stream.graphs[0].launches == replay
    assert stream.ended == 1 and cp.pool.calls == sizes * 2, "replays must neither capture nor allocate again"


@pytest.mark.parametrize("captured_sizes, message", [
    ([64, 256, 64], "allocation 1 of the captured step is 256 bytes, the recorded one 128"),
    ([64, 128, 64, 32], "allocated more than the 3 buffers recorded"),
    ([64, 128], "used 2 of the 3 recorded buffers"),
])
def test_a_capture_that_differs_from_the_plan_is_refused(captured_sizes, message):
    cp, stream = FakeCupy(), FakeStream()
    step = allocating_step(cp, lambda i: captured_sizes if i == 3 else [64, 128, 64])
    captured = CapturedStep(cp, stream)
    captured.run(step)
    captured.run(step)
    with pytest.raises(PlanMismatch, match=message):
        captured.run(step)
    assert not stream.capturing, "a failed capture must be ended, so the stream stays usable"
    assert all(graph.launches == 0 for graph in stream.graphs), "a mismatched graph must never be launched"


def test_an_error_inside_the_capture_ends_it_and_propagates():
    cp, stream = FakeCupy(), FakeStream()

    def step():
        if stream.capturing:
            raise ValueError("a host check failed inside the step")
        return cp.empty(8)

    captured = CapturedStep(cp, stream)
    captured.run(step)
    captured.run(step)
    with pytest.raises(ValueError, match="host check failed"):
        captured.run(step)
    assert not stream.capturing and stream.ended == 1


def test_buffer_plan_serves_in_order_and_checks_sizes():
    pool = FakePool()
    plan = BufferPlan(pool.malloc)
    first, second = plan.allocate(10), plan.allocate(20)
    plan.start_replay()
    assert (plan.allocate(10), plan.allocate(20)) == (first, second)
    plan.finish_replay()
    plan.start_replay()
    with pytest.raises(PlanMismatch, match="allocation 0 of the captured step is 20 bytes, the recorded one 10"):
        plan.allocate(20)
    assert pool.calls == [10, 20]


def test_tracing_uses_the_uncaptured_step():
    class Model:  # cached_forward needs only new_cache before its first step
        def new_cache(self, batch, capacity):
            self.cache_made = (batch, capacity)

    model = Model()
    with trace.capture():
        step = graph_stepper(model, 2, 9)
    assert model.cache_made == (2, 9) and step.__qualname__.startswith("cached_forward")


def tiny_config():
    import reference
    return reference.JetMoeConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_key_value_heads=2,
                                  kv_channels=4, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)


def test_check_step_passes_generates_inputs_through():
    rng = np.random.default_rng()
    config, batch, prompt = tiny_config(), 3, int(rng.integers(1, 9))
    ids = rng.integers(0, config.vocab_size, size=(batch, prompt))
    mask = np.ones((batch, prompt), np.int32)
    mask[0, :prompt - 1] = 0  # left padding, as generate passes it
    positions = rng.integers(0, 20, size=(1, prompt))  # [1, T] broadcasts to every row
    got_ids, got_mask, got_positions = check_step(config, batch, prompt + 2, 0, ids, mask, positions)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_mask, mask)
    assert got_mask.dtype == np.int64 and got_positions.shape == (batch, prompt)
    np.testing.assert_array_equal(got_positions, np.repeat(positions, batch, axis=0))
    step = check_step(config, batch, prompt + 2, prompt, ids[:, :1], np.ones((batch, prompt + 1), np.int64), positions[:, :1])
    assert step[0].shape == (batch, 1)


@pytest.mark.parametrize("seen, ids, mask, message", [
    (0, [[1, 50]], [[1, 1]], "token id 50, outside the vocabulary"),  # CuPy would wrap it: the wrong row, silently
    (0, [[1, 2]], [[1, 1, 1]], r"attention_mask has shape \(1, 3\), expected .* \(1, 2\)"),
    (0, [[1], [2]], [[1], [1]], "runs batch 1, the input has batch 2"),
    (0, [[1] * 7], [[1] * 7], "0 cached \\+ 7 new tokens exceed the capacity 6"),
    (3, [[1, 2]], [[1] * 5], "one token per row"),
    (3, [[1]], [[1, 1, 1, 0]], "one token per row"),  # the captured step marks its column present
    (6, [[1]], [[1] * 7], "6 cached \\+ 1 new tokens exceed the capacity 6"),
])
def test_check_step_refuses_what_the_captured_step_cannot_run(seen, ids, mask, message):
    ids = np.array(ids)
    positions = np.arange(seen, seen + ids.shape[1])[None]
    with pytest.raises(ValueError, match=message):
        check_step(tiny_config(), 1, 6, seen, ids, np.array(mask), positions)

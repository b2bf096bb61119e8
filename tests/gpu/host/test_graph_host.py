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

from gpu.graph import BufferPlan, CapturedStep, PlanMismatch, graph_stepper
from reference import trace


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
    captured = CapturedStep(cp, allocating_step(cp, lambda i: sizes), stream)
    captured.run()  # warm-up: the step's own allocations, not planned
    assert cp.pool.calls == sizes and captured.plan.sizes == []
    recorded = captured.run()  # recording: the same sizes, now kept by the plan
    assert captured.plan.sizes == sizes and cp.pool.calls == sizes * 2
    result = captured.run()  # capture: served from the plan, the pool is never called
    assert cp.pool.calls == sizes * 2, "the captured run allocated"
    assert result == recorded, "the capture must reuse the recorded buffers, in order"
    assert stream.ended == 1 and stream.graphs[0].launches == 1 and not stream.capturing
    for replay in range(2, 6):
        assert captured.run() == result
        assert stream.graphs[0].launches == replay
    assert stream.ended == 1 and cp.pool.calls == sizes * 2, "replays must neither capture nor allocate again"
    assert captured.plan.total_bytes == sum(sizes)


@pytest.mark.parametrize("captured_sizes, message", [
    ([64, 256, 64], "allocation 1 of the captured step is 256 bytes, the recorded one 128"),
    ([64, 128, 64, 32], "allocated more than the 3 buffers recorded"),
    ([64, 128], "used 2 of the 3 recorded buffers"),
])
def test_a_capture_that_differs_from_the_plan_is_refused(captured_sizes, message):
    cp, stream = FakeCupy(), FakeStream()
    captured = CapturedStep(cp, allocating_step(cp, lambda i: captured_sizes if i == 3 else [64, 128, 64]), stream)
    captured.run()
    captured.run()
    with pytest.raises(PlanMismatch, match=message):
        captured.run()
    assert not stream.capturing, "a failed capture must be ended, so the stream stays usable"
    assert all(graph.launches == 0 for graph in stream.graphs), "a mismatched graph must never be launched"


def test_an_error_inside_the_capture_ends_it_and_propagates():
    cp, stream = FakeCupy(), FakeStream()

    def step():
        if stream.capturing:
            raise ValueError("a host check failed inside the step")
        return cp.empty(8)

    captured = CapturedStep(cp, step, stream)
    captured.run()
    captured.run()
    with pytest.raises(ValueError, match="host check failed"):
        captured.run()
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

"""cudasim's streams and graphs: capture records device work without running it, replay re-runs it on whatever
the buffers hold then, and what a GPU refuses during capture is refused (pool allocations, host reads)."""

import numpy as np
import pytest

import cudasim as cp

SOURCE = r"""
extern "C" __global__ void axpy(const float* x, float* y, float a, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""


@pytest.fixture(scope="module")
def axpy():
    return cp.RawModule(code=SOURCE).get_function("axpy")


def test_capture_records_and_replay_reruns(axpy, rng):
    x, y0 = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(np.float32)
    dx, dy = cp.asarray(x), cp.asarray(y0)
    stream = cp.cuda.Stream(non_blocking=True)
    buffer = cp.get_default_memory_pool().malloc(400)  # for the array operation's result: no pool use in capture
    with stream:
        stream.begin_capture()
        try:
            axpy((1,), (128,), (dx, dy, np.float32(2), np.int64(100)))
            with cp.cuda.using_allocator(lambda size: buffer):
                doubled = dy * 2  # an array operation, recorded too
        finally:
            graph = stream.end_capture()
    np.testing.assert_array_equal(dy.get(), y0)  # nothing ran while capturing
    graph.launch(stream)
    np.testing.assert_array_equal(dy.get(), y0 + np.float32(2) * x)
    np.testing.assert_array_equal(doubled.get(), 2 * dy.get())
    dx.set(np.ones(100, np.float32))  # replay reads what the buffers hold now
    graph.launch(stream)
    np.testing.assert_array_equal(dy.get(), (y0 + np.float32(2) * x) + np.float32(2))
    np.testing.assert_array_equal(doubled.get(), 2 * dy.get())


def test_pool_allocation_during_capture_is_refused():
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(cp.cuda.CUDARuntimeError, match="allocation .* during stream capture"):
                cp.empty(10, cp.float32)
        finally:
            stream.end_capture()


def test_custom_allocator_serves_capture():
    kept = [cp.get_default_memory_pool().malloc(40)]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with cp.cuda.using_allocator(lambda size: kept[0]):
                out = cp.empty(10, cp.float32)
        finally:
            stream.end_capture()
    assert out.data.ptr == kept[0].ptr


def test_host_reads_during_capture_are_refused():
    a = cp.zeros(4, cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(cp.cuda.CUDARuntimeError, match="during stream capture"):
                a.get()
        finally:
            stream.end_capture()


def test_work_on_another_stream_during_capture_is_refused(axpy):
    x = cp.zeros(4, cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    stream.begin_capture()
    try:
        with pytest.raises(cp.cuda.CUDARuntimeError, match="on another stream"):
            axpy((1,), (32,), (x, x, np.float32(1), np.int64(4)))  # the current stream is the default one
    finally:
        stream.end_capture()


def test_host_and_device_arrays_stay_apart():
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(cp.zeros(3))
    with pytest.raises(TypeError, match="NumPy array in a device operation"):
        cp.zeros(3) + np.ones(3)


def test_unsupported_cupy_calls_name_themselves():
    with pytest.raises(AttributeError, match=r"cudasim does not provide cupy.fft"):
        cp.fft
    with pytest.raises(AttributeError, match=r"cudasim does not provide cupy.cuda.texture"):
        cp.cuda.texture
    with pytest.raises(AttributeError, match=r"cudasim.ndarray does not provide .toDlpack"):
        cp.zeros(2).toDlpack()

"""Streams, events and graphs. Work runs at once, in order; a capturing stream records it instead.

Every device operation (a kernel launch, an array operation that writes device memory) goes through `submit`.
While a stream captures, its work is recorded, not run, and Graph.launch replays the recording; work on another
stream during a capture, a host read of device memory, or an allocation from the default pool is an error, as in
CUDA's global capture mode.
"""

import threading
import time


class CUDARuntimeError(RuntimeError):
    pass


_state = threading.local()
_capturing = []  # the stream capturing now, if any


def capturing_stream():
    return _capturing[0] if _capturing else None


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.ptr = 0 if null else id(self)
        self._recording = None

    def __enter__(self):
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _state.stack.pop()

    def synchronize(self):
        check_not_capturing("stream.synchronize()")

    def begin_capture(self, mode=None):
        if _capturing:
            raise CUDARuntimeError("cudaErrorIllegalState: a stream is capturing already")
        if self.ptr == 0:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: the legacy default stream cannot capture")
        self._recording = []
        _capturing.append(self)

    def end_capture(self):
        if capturing_stream() is not self:
            raise CUDARuntimeError("cudaErrorIllegalState: end_capture on a stream that is not capturing")
        _capturing.clear()
        work, self._recording = self._recording, None
        return Graph(work)

    def is_capturing(self):
        return capturing_stream() is self

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event


Stream.null = Stream(null=True)


def get_current_stream():
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else Stream.null


def check_not_capturing(what):
    if _capturing:
        raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} during stream capture (the host would "
                               "wait for work that is only being recorded)")


def submit(work, what):
    """Run `work()` now, or record it on the capturing stream; -> True when it ran."""
    stream = capturing_stream()
    if stream is None:
        work()
        return True
    if get_current_stream() is not stream:
        raise CUDARuntimeError(f"cudaErrorStreamCaptureImplicit: {what} on another stream while a stream captures")
    stream._recording.append(work)
    return False


class Graph:
    """A captured sequence of device work; launch re-runs it in order."""

    def __init__(self, work):
        self.work = work

    def launch(self, stream=None):
        check_not_capturing("graph.launch()")
        for w in self.work:
            w()

    def upload(self, stream=None):
        pass


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        check_not_capturing("event.synchronize()")

    @property
    def done(self):
        return True


def get_elapsed_time(start, end):
    """Milliseconds between two recorded events (host time: the emulator's work runs when submitted)."""
    return (end.time - start.time) * 1e3

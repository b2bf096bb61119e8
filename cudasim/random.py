"""cupy.random's default_rng: NumPy's generator, its draws copied to the device."""

import numpy as np

from .array import asarray


class Generator:
    def __init__(self, seed=None):
        self._rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        draw = getattr(self._rng, name)
        return lambda *args, **kwargs: asarray(draw(*args, **kwargs))


def default_rng(seed=None):
    return Generator(seed)

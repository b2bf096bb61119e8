"""Host-side checks of the GPU model's inputs, on the CPU (no CuPy, no GPU).

A StaticKVCache passed to model(...) must be refused before any device work: the model never calls begin_step,
so the cache would overwrite positions 0..T-1 on every forward and attention would run over its whole capacity.
Instances are made with __new__ (no __init__: that allocates device buffers); isinstance is all the check reads.
"""

import pytest

from gpu.cache import KVCache, StaticKVCache
from gpu.model import JetMoeForCausalLM, JetMoeModel, check_forward_cache


def unallocated(cache_class):
    return cache_class.__new__(cache_class)


def test_static_cache_is_refused():
    with pytest.raises(TypeError, match=r"StaticKVCache.*captured decode steps.*begin_step.*not for model\(\.\.\.\)"):
        check_forward_cache(unallocated(StaticKVCache))


@pytest.mark.parametrize("cache", [None, unallocated(KVCache)])
def test_dynamic_cache_or_none_passes(cache):
    check_forward_cache(cache)


def test_model_call_refuses_static_cache_before_device_work():
    # The model is never built (that uploads weights): the check must come before anything reads the device or
    # self. Without it this raises GpuUnavailable here (no CuPy) or AttributeError (on a GPU machine).
    model = JetMoeModel.__new__(JetMoeModel)
    with pytest.raises(TypeError, match="StaticKVCache"):
        model(input_ids=[[1, 2]], past_key_values=unallocated(StaticKVCache))


@pytest.mark.parametrize("method,arg", [("save_pretrained", "checkpoint"), ("load_state_dict", {})])
def test_reference_savers_are_refused_with_a_way_out(method, arg):
    # inherited from reference.io.checkpoint.Pretrained through the reference classes, they would meet device
    # arrays (in bf16 mode raw uint16 bits); refused before reading the model
    model = JetMoeForCausalLM.__new__(JetMoeForCausalLM)
    with pytest.raises(TypeError, match="the GPU twin does not .* reference"):
        getattr(model, method)(arg)

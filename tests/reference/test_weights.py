"""reference/io/mapped.py: a bf16 checkpoint whose matrices stay in the file gives what one converted at load gives
(to float32 rounding: the same products, summed in another order), converts only what the forward touches, and says
clearly when a model cannot fit."""

import ml_dtypes
import numpy as np
import pytest

import reference.io.mapped as mapped_module
from reference import CheckpointError, JetMoeConfig, JetMoeForCausalLM, capture
from reference.io.checkpoint import random_parameters, write_checkpoint
from reference.io.mapped import MappedWeight, convert
from reference.linear import linear

# Big enough that every matrix spans several decode blocks once DECODE_BLOCK_BYTES is patched down.
CONFIG = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
              intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
SMALL_BUDGET = 1 << 16  # bytes: the norms, biases and routers (about 5 KB here) fit, the matrices (300 KB) do not


def bf16_checkpoint(path, rng, **overrides):
    config = JetMoeConfig(**{**CONFIG, **overrides})
    tensors = random_parameters(config, "causal_lm", rng, std=0.3, dtype=np.float32)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    names = {n: ("model." + n if n != "lm_head.weight" else n) for n in tensors}
    write_checkpoint(str(path), config, {names[n]: t.astype(ml_dtypes.bfloat16) for n, t in tensors.items()})
    return str(path)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path, rng):
    return bf16_checkpoint(tmp_path / "bf16", rng, tie_word_embeddings=request.param)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(mapped_module, "DECODE_BLOCK_BYTES", 1)  # every decode product runs in 64-row blocks


def test_bf16_shift_equals_ml_dtypes(rng):
    bits = rng.integers(0, 2**16, size=10_000, dtype=np.uint16)  # every kind of bf16: normals, subnormals, inf
    not_nan = ((bits & 0x7F80) != 0x7F80) | ((bits & 0x7F) == 0)  # NaNs dropped: astype may quiet their payload
    bits = bits[not_nan]
    src = bits.view(ml_dtypes.bfloat16)
    want = src.astype(np.float32)
    np.testing.assert_array_equal(convert(src, np.empty(src.shape, np.float32)), want)
    # the blocks' path: one widening cast 2 bytes into this thread's reused buffer, which holds other values from
    # a bigger block before (so the buffer is not freshly zeroed) and must come back bit for bit all the same
    mapped_module.converted(rng.permutation(np.concatenate([src, src])), np.float32)
    np.testing.assert_array_equal(mapped_module.converted(src.reshape(-1, 1), np.float32), want.reshape(-1, 1))
    np.testing.assert_array_equal(mapped_module.converted(src[1:], np.float32), want[1:])


def test_budget_decides_where_weights_live(checkpoint):
    converted = JetMoeForCausalLM.from_pretrained(checkpoint)  # a few hundred KB: far below half the memory
    mapped = JetMoeForCausalLM.from_pretrained(checkpoint, max_memory=SMALL_BUDGET)
    assert all(isinstance(t, np.ndarray) for t in converted.state_dict().values())
    for name, tensor in mapped.state_dict().items():
        small = tensor.ndim == 1 or name.endswith("router.layer.weight")
        assert isinstance(tensor, np.ndarray) == small, name
    layer = mapped.model.layers[0]
    assert isinstance(layer.mlp.input_linear, MappedWeight) and layer.mlp.input_linear.data.dtype == ml_dtypes.bfloat16
    assert mapped.dtype == np.float32 and mapped.model.embed_tokens.dtype == np.float32


# A mapped matrix's decode product runs block by block on our threads, a converted one is one x @ w.T on BLAS's:
# the same sums in another order, a few ulps apart per product. Through the model the softmax of this random
# model's attention scores (std-0.3 weights) amplifies them: over 40 seeds the worst traced tensor was 1.2e-5 of
# its largest value, the median 3.4e-6. 1e-4 leaves 8x room over that worst case; a wrong block, row or expert
# is off by O(1).
MAPPED_RTOL = 1e-4


def test_mapped_matches_converted(checkpoint, small_blocks, rng):
    converted = JetMoeForCausalLM.from_pretrained(checkpoint)
    mapped = JetMoeForCausalLM.from_pretrained(checkpoint, max_memory=SMALL_BUDGET)
    for batch, tokens in [(1, 3), (2, 5), (3, 12)]:  # decode-sized (<= 16 rows: blocks) and prefill (whole)
        ids = rng.integers(0, CONFIG["vocab_size"], size=(batch, tokens))
        with capture() as want:
            converted(input_ids=ids)
        with capture() as got:
            mapped(input_ids=ids)
        assert list(got) == list(want)
        for name in want:
            if want[name].dtype.kind == "f":  # float32 sums in another order (MAPPED_RTOL)
                scale = max(np.max(np.abs(want[name])), np.finfo(np.float32).tiny)
                assert np.max(np.abs(got[name] - want[name])) <= MAPPED_RTOL * scale, name
            else:  # routing and inputs: equal
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    prompt = rng.integers(0, CONFIG["vocab_size"], size=(2, 4))
    np.testing.assert_array_equal(mapped.generate(prompt, max_new_tokens=6),
                                  converted.generate(prompt, max_new_tokens=6))
    assert all(np.array_equal(np.asarray(t), converted.state_dict()[n]) for n, t in mapped.state_dict().items())


def test_mapped_matches_converted_where_blas_threads(rng):
    # at a size OpenBLAS splits across threads (64 MiB of float32 here), for every decode row count and a prefill
    table = rng.standard_normal((8192, 2048), dtype=np.float32).astype(ml_dtypes.bfloat16)
    converted, mapped = table.astype(np.float32), MappedWeight(table, np.float32)
    for rows in [1, 2, 5, mapped_module.DECODE_ROWS, mapped_module.DECODE_ROWS + 1]:
        x = rng.standard_normal((rows, 2048), dtype=np.float32)
        got, want = linear(x, mapped), linear(x, converted)
        # one product: 2048 float32 terms summed in another order, normwise within a few hundred ulps
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), f"{rows} rows"


def test_decode_converts_only_the_routed_experts(tmp_path, rng, monkeypatch):
    model = JetMoeForCausalLM.from_pretrained(bf16_checkpoint(tmp_path / "bf16", rng), max_memory=SMALL_BUDGET)
    stacks = {}  # base address of each expert's slice -> (layer, part, expert)
    for i, layer in enumerate(model.model.layers):
        for part, stack in [("attention.query", layer.attention.input_linear),
                            ("attention.output", layer.attention.output_linear),
                            ("mlp.input", layer.mlp.input_linear), ("mlp.output", layer.mlp.output_linear)]:
            for e in range(stack.shape[0]):
                stacks[stack.data[e].ctypes.data] = (i, part, e)
    converted = []
    real_converted = mapped_module.converted

    def recording_converted(src, dtype):
        converted.append(src.ctypes.data)
        return real_converted(src, dtype)

    monkeypatch.setattr(mapped_module, "converted", recording_converted)
    cache = model.new_cache(1, capacity=8)
    model(input_ids=rng.integers(0, CONFIG["vocab_size"], size=(1, 3)), past_key_values=cache)
    converted.clear()
    with capture() as trace:
        model(input_ids=rng.integers(0, CONFIG["vocab_size"], size=(1, 1)), past_key_values=cache)
    # The first block of each expert used starts at its slice's first row; the others start inside it.
    touched = {stacks[address] for address in converted if address in stacks}
    routed = set()
    for i in range(CONFIG["num_hidden_layers"]):
        for e in trace[f"layers.{i}.attention.router.top_k_indices"][0]:
            routed |= {(i, "attention.query", int(e)), (i, "attention.output", int(e))}
        for e in trace[f"layers.{i}.mlp.router.top_k_indices"][0]:
            routed |= {(i, "mlp.input", int(e)), (i, "mlp.output", int(e))}
    assert len(routed) == 2 * 4 * 2 and touched == routed  # 2 layers x 4 parts x K=2 experts


def test_embedding_lookup_converts_only_its_rows(rng):
    table = rng.standard_normal((50, 8)).astype(np.float32).astype(ml_dtypes.bfloat16)
    mapped = MappedWeight(table, np.float32)
    ids = rng.integers(0, 50, size=(2, 3))
    np.testing.assert_array_equal(mapped[ids], table.astype(np.float32)[ids])
    assert mapped[ids].shape == (2, 3, 8) and mapped[ids].dtype == np.float32


def test_too_big_even_mapped_is_a_clear_error(checkpoint):
    with pytest.raises(CheckpointError, match=r"does not fit: even with its matrices left in the file it needs "
                                              r"0\.00 GiB of converted tensors, and 0\.00 GiB are available"):
        JetMoeForCausalLM.from_pretrained(checkpoint, max_memory=100)

"""The whole GPU twin against reference/ (marked requires_gpu: CuPy and a CUDA GPU, or the CPU emulator cudasim).

Tolerances, relative to max |reference| per tensor:
- float32 weights: 1e-4 (float32 throughout, TF32 off, different summation orders than NumPy over L layers);
- bf16 weights: 2e-2 against the reference holding the same bf16-rounded weights (float32 activations; the
  tensor-core prefill path also rounds activations to bf16 when staging them).
On the CPU emulator the same bounds hold: its expf is glibc's (not CUDA's 2-ulp one) and its mma.sync sums the exact
bf16 products in double (not the tensor cores' order), differences far inside both tolerances.
Routing must be identical wherever the reference's top-k margin exceeds what float32 noise can flip.
"""

import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import reference
from reference.generation import cached_forward, generate, positions_from_mask

from gpu.attention import plan_attention
from gpu.graph import GraphDecoder, graph_stepper
from gpu.model import FLOAT32_ALWAYS
from gpu.model import JetMoeForCausalLM as GpuCausalLM

from gpu_helpers import cp
from paths import GOLDEN, GOLDEN_NAMES as NAMES

pytestmark = pytest.mark.requires_gpu  # no CUDA GPU: they run on the CPU emulator (tests/conftest.py)

FLOAT32_RTOL = 1e-4
BF16_RTOL = 2e-2
MARGIN = 1e-3  # routing decisions are compared only where the reference's top-k gap exceeds this


def rel_err(got, want):
    got, want = cp.asnumpy(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert np.all(np.isfinite(got)), "non-finite values in the GPU output"
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def models(name, dtype):
    path = os.path.join(GOLDEN, name)
    return (reference.JetMoeForCausalLM.from_pretrained(path, dtype=np.float64),
            GpuCausalLM.from_pretrained(path, dtype=dtype), load_file(os.path.join(path, "inputs.safetensors")))


@pytest.mark.parametrize("name", NAMES)
def test_float32_trace_matches_reference(name):
    ref, twin, inputs = models(name, np.float32)
    ids = inputs["input_ids"]
    with reference.capture() as trace_ref:
        ref(input_ids=ids)
    with reference.capture() as trace_gpu:
        twin(input_ids=cp.asarray(ids))  # CuPy inputs are accepted too
    assert list(trace_gpu) == list(trace_ref), "the GPU twin must emit the reference's trace names, in order"
    first, rows = reference.compare(trace_gpu, trace_ref, rtol=FLOAT32_RTOL)
    assert first is None, "\n" + reference.io.compare.format_rows(rows)


@pytest.mark.parametrize("name", NAMES)
def test_float32_scenarios(name):
    ref, twin, inputs = models(name, np.float32)
    mask = inputs["padded_mask"]
    kwargs = dict(input_ids=inputs["padded_ids"], attention_mask=mask, position_ids=positions_from_mask(mask))
    assert rel_err(twin(**kwargs).logits, ref(**kwargs).logits) <= FLOAT32_RTOL
    full = ref(input_ids=inputs["input_ids"]).logits
    cache, start, pieces = None, 0, []
    for n in inputs["decode_splits"]:
        out = twin(input_ids=inputs["input_ids"][:, start:start + int(n)], past_key_values=cache, use_cache=True)
        cache, start = out.past_key_values, start + int(n)
        pieces.append(cp.asnumpy(out.logits))
    assert rel_err(cp.asarray(np.concatenate(pieces, axis=1)), full[:, :start]) <= FLOAT32_RTOL
    out = twin(input_ids=inputs["input_ids"], labels=inputs["labels"], output_router_logits=True)
    want = ref(input_ids=inputs["input_ids"], labels=inputs["labels"], output_router_logits=True)
    assert abs(float(out.loss) - float(want.loss)) <= FLOAT32_RTOL * abs(float(want.loss))


@pytest.mark.parametrize("name", NAMES)
def test_routing_identical_where_margins_are_clear(name):
    ref, twin, inputs = models(name, np.float32)
    with reference.capture() as trace_ref:
        ref(input_ids=inputs["input_ids"])
    with reference.capture() as trace_gpu:
        twin(input_ids=inputs["input_ids"])
    k = ref.config.num_experts_per_tok
    for name_ in (n for n in trace_ref if n.endswith("router.logits")):
        logits = np.sort(trace_ref[name_], axis=-1)[:, ::-1]
        clear = (logits[:, k - 1] - logits[:, k] > MARGIN) if k < logits.shape[1] else np.ones(len(logits), bool)
        indices = name_.replace("logits", "top_k_indices")
        np.testing.assert_array_equal(cp.asnumpy(trace_gpu[indices])[clear], trace_ref[indices][clear],
                                      err_msg=f"{indices}: experts differ where the margin exceeds {MARGIN}")


def bf16_rounded(ref):
    """The float64 reference with exactly the weights the bf16 twin holds: matrices rounded to bf16, the
    FLOAT32_ALWAYS tensors (norms, biases, routers) left alone. Comparing against the unrounded reference would
    measure the checkpoint's sensitivity to bf16 weights (rounding can flip a top-k choice where a router margin
    is small), not the twin."""
    rounded = {n: (t if n.endswith(FLOAT32_ALWAYS) else t.astype(ml_dtypes.bfloat16).astype(np.float64))
               for n, t in ref.model.state_dict().items()}
    head = {"lm_head.weight": ref.lm_head.astype(ml_dtypes.bfloat16).astype(np.float64)}
    if ref.config.tie_word_embeddings:
        head["lm_head.weight"] = rounded["embed_tokens.weight"]
    return reference.JetMoeForCausalLM(ref.config, rounded, head)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_logits(name):
    ref, twin, inputs = models(name, "bfloat16")
    want = bf16_rounded(ref)(input_ids=inputs["input_ids"]).logits
    assert rel_err(twin(input_ids=inputs["input_ids"]).logits, want) <= BF16_RTOL


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_identical(name):
    _, twin, inputs = models(name, np.float32)
    ref32 = reference.JetMoeForCausalLM.from_pretrained(os.path.join(GOLDEN, name), dtype=np.float32)
    mask = inputs["padded_mask"]
    want = ref32.generate(inputs["padded_ids"], attention_mask=mask, max_new_tokens=8)
    got = twin.generate(inputs["padded_ids"], attention_mask=mask, max_new_tokens=8)
    np.testing.assert_array_equal(cp.asnumpy(got), want)


def random_twin(rng, dtype, **overrides):
    """A small GPU model with every weight drawn at random (a fresh seed each run)."""
    config = reference.JetMoeConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_key_value_heads=4,
                                    kv_channels=16, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                                    **overrides)
    return GpuCausalLM.from_reference(reference.JetMoeForCausalLM.from_random(config, seed=int(rng.integers(1 << 30))),
                                      dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_bitwise_deterministic(dtype):
    rng = np.random.default_rng()
    twin = random_twin(rng, dtype)
    config = twin.config
    ids = rng.integers(0, config.vocab_size, size=(3, 77))
    first, second = twin(input_ids=ids).logits, twin(input_ids=ids).logits
    assert cp.array_equal(first, second), "two runs on the same input must be bitwise identical"


def recording(stepper, steps):
    """A generate stepper that keeps a host copy of every step's logits."""
    def make(model, batch, capacity):
        forward_step = stepper(model, batch, capacity)

        def step(step_ids, mask, positions):
            logits = forward_step(step_ids, mask, positions)
            steps.append(cp.asnumpy(logits))
            return logits
        return step
    return make


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_graphed_generation_equals_eager_bit_for_bit(dtype, do_sample):
    # The captured decode step launches the same kernels with the same arguments as the eager one, so every
    # step's logits must be bitwise equal (no tolerance), and then so are the tokens, greedy or sampled.
    rng = np.random.default_rng()
    twin = random_twin(rng, dtype, eos_token_id=None)  # no early stop: every step past the capture is compared
    ids = rng.integers(0, twin.config.vocab_size, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    seed = int(rng.integers(1 << 30))
    runs = {}
    for name, stepper in (("graph", graph_stepper), ("eager", cached_forward)):
        logits = []
        tokens = generate(twin, ids, attention_mask=mask, max_new_tokens=12, do_sample=do_sample, seed=seed,
                          stepper=recording(stepper, logits))
        runs[name] = tokens, logits
    (graph_tokens, graph_logits), (eager_tokens, eager_logits) = runs["graph"], runs["eager"]
    np.testing.assert_array_equal(graph_tokens, eager_tokens)
    assert len(graph_logits) == len(eager_logits) == 12
    for i, (g, e) in enumerate(zip(graph_logits, eager_logits)):
        assert np.array_equal(g, e), f"step {i}: graphed logits differ from eager ones"


def test_captured_decode_allocates_nothing_and_replays():
    rng = np.random.default_rng()
    twin = random_twin(rng, np.float32)
    config = twin.config
    batch, prompt, new = 2, 7, 6
    decoder = GraphDecoder(twin, batch, prompt + new)
    pool = cp.get_default_memory_pool()
    ids, mask = rng.integers(0, config.vocab_size, size=(batch, prompt)), np.ones((batch, prompt), np.int64)
    decoder(ids, mask, positions_from_mask(mask))
    for step in range(new - 1):
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        decoder(rng.integers(0, config.vocab_size, size=(batch, 1)), mask, positions_from_mask(mask)[:, -1:])
        if step == 2:  # the capture: from here on every call only launches the graph
            captured_pool = pool.used_bytes(), pool.total_bytes()
    assert decoder.decode.graph is not None and decoder.decode.calls == new - 1
    assert decoder.decode.plan.sizes, "the recording run must plan the step's buffers"
    assert (pool.used_bytes(), pool.total_bytes()) == captured_pool, "a replay allocated from the CuPy pool"
    assert decoder.cache.get_seq_length() == prompt + new - 1
    np.testing.assert_array_equal(cp.asnumpy(decoder.attention_mask)[:, :prompt + new - 1], 1)


def test_graphed_decode_with_split_keys_matches_eager():
    # A capacity past one decode key split (128 keys) exercises the split kernel, its combine and the workspace
    # inside the capture. The graph's split plan follows the capacity and eager's the keys so far, so the keys may
    # be summed in other chunks: float32 within 1e-5 of the largest logit (summation order over ~160 keys, against
    # logits of order 1; a stale id, position, mask column or key count moves them by far more).
    rng = np.random.default_rng()
    twin = random_twin(rng, np.float32, eos_token_id=None)
    batch, prompt, new = 2, 150, 10
    heads, top_k = twin.config.num_key_value_heads, twin.config.num_experts_per_tok
    num_sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    plan = plan_attention(batch, top_k * heads, heads, 1, prompt + new, num_sms)
    assert plan.kernel == "decode" and plan.num_splits > 1, \
        "the capacity must split the keys for this test to mean much"
    ids = rng.integers(0, twin.config.vocab_size, size=(batch, prompt))
    mask = np.ones_like(ids)
    mask[0, :9] = 0  # left padding
    runs = {}
    for name, stepper in (("graph", graph_stepper), ("eager", cached_forward)):
        logits = []
        generate(twin, ids, attention_mask=mask, max_new_tokens=new, stepper=recording(stepper, logits))
        runs[name] = logits
    assert len(runs["graph"]) == len(runs["eager"]) == new
    for i, (g, e) in enumerate(zip(runs["graph"], runs["eager"])):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max(), err_msg=f"step {i}")

"""GPU benchmark: the CuPy twin against HF transformers eager (torch bf16) and the decode bandwidth bound.

Workload: a JetMoE-8B-shaped model (D=2048, L=24, E=8, K=2, H=16, Dh=128, F=5632, V=32000, tied lm_head) with
random bf16 weights made on the device (nothing downloaded), shared by both sides. Measured in one run on one
device: prefill tokens/s (1x2048), decode tokens/s at batch 1, 8 and 32 after a 512-token context (op by op,
and replaying one CUDA graph a step), and the bandwidth bound for batch-1 decode = measured copy bandwidth /
bytes of active weights per token.
Prints a markdown table; `--json` also writes the numbers. HF here is only a speed baseline (the device may
have another transformers than the 4.56.2 that defines our semantics).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu.device import require_cupy  # noqa: E402
from gpu.graph import GraphDecoder  # noqa: E402
from gpu.model import FLOAT32_ALWAYS, JetMoeForCausalLM  # noqa: E402
from reference.config import JetMoeConfig  # noqa: E402
from reference.counting import active_parameters  # noqa: E402
from reference.generation import positions_from_mask  # noqa: E402
from reference.io.checkpoint import base_parameter_shapes, is_norm_weight  # noqa: E402

EIGHT_B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_local_experts=8, num_experts_per_tok=2,
               num_key_value_heads=16, kv_channels=128, intermediate_size=5632, max_position_embeddings=4096,
               tie_word_embeddings=True)


def active_weight_bytes(config):
    """Bytes of weights one batch-1 decode token reads (reference.counting.active_parameters): bf16 matrices, with
    the routers, norms and biases in float32 as the bf16 GPU model keeps them (gpu.model.FLOAT32_ALWAYS)."""
    itemsize = {"routers": 4, "norms and biases": 4}
    return sum(count * itemsize.get(part, 2) for part, count in active_parameters(config).items())


def device_weights(config, seed):
    """Random weights on the device: bf16 bits for matrices, float32 for norms, biases and routers."""
    cp = require_cupy()
    rng = cp.random.default_rng(seed)
    tensors = {}
    for name, shape in base_parameter_shapes(config).items():
        if is_norm_weight(name):
            tensors[name] = (0.5 + rng.random(shape, dtype=cp.float32)).astype(cp.float32)
        elif name.endswith(FLOAT32_ALWAYS):
            tensors[name] = (0.02 * rng.standard_normal(shape, dtype=cp.float32)).astype(cp.float32)
        else:
            values = rng.standard_normal(shape, dtype=cp.float32) * cp.float32(1.0 / np.sqrt(shape[-1]))
            bits = values.view(cp.uint32)
            tensors[name] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)  # round to nearest even
            del values, bits
    return tensors


def copy_bandwidth(nbytes=2 << 30, repeats=20):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    cp = require_cupy()
    src = cp.random.default_rng(0).random(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        dst[...] = src
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * nbytes / float(np.median(times[3:]))


def timed(fn, repeats):
    cp = require_cupy()
    fn()  # warm-up: kernel compilation and allocation stay out of the numbers
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def ours_decode(model, batch, context, steps, rng):
    """Seconds for `steps` greedy decode steps after a `context`-token prefill, batch `batch`."""
    cp = require_cupy()
    ids = rng.integers(0, model.config.vocab_size, size=(batch, context))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, cp.argmax(out.logits[:, -1], axis=-1)[:, None]
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = cp.argmax(out.logits[:, -1], axis=-1)[:, None]
    cp.cuda.Device().synchronize()
    return time.perf_counter() - start


def ours_graph_decode(model, batch, context, steps, rng):
    """Seconds for `steps` greedy decode steps, each one replay of the captured CUDA graph (gpu/graph.py), after a
    `context`-token prefill; run as generate runs them, the B token ids going to the host and back each step."""
    cp = require_cupy()
    warm = 3  # CapturedStep's eager, recording and capturing runs, not timed
    decoder = GraphDecoder(model, batch, context + warm + steps)
    mask = np.ones((batch, context), np.int64)
    logits = decoder(rng.integers(0, model.config.vocab_size, size=(batch, context)), mask, positions_from_mask(mask))
    for i in range(warm + steps):
        if i == warm:
            cp.cuda.Device().synchronize()
            start = time.perf_counter()
        token = cp.asnumpy(logits.argmax(axis=-1))[:, None]  # [B, 1]
        logits = decoder(token, np.ones((batch, context + i + 1), np.int64), np.full((batch, 1), context + i))
    cp.cuda.Device().synchronize()
    return time.perf_counter() - start


def hf_model_from(ours, config):
    """HF JetMoeForCausalLM (eager, bf16, on the GPU) holding exactly our weights."""
    import torch
    import transformers
    hf_cfg = transformers.JetMoeConfig(**{k: v for k, v in config.to_dict().items()
                                          if k not in ("num_attention_heads", "architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    with torch.device("cuda"):
        model = transformers.JetMoeForCausalLM._from_config(hf_cfg, torch_dtype=torch.bfloat16).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in ours.model.tensors.items():
            src = torch.from_dlpack(t)
            src = src.view(torch.bfloat16) if t.dtype.name == "uint16" else src.to(torch.bfloat16)
            params["model." + name].copy_(src)
    return model


def hf_decode(model, batch, context, steps, rng):
    import torch
    ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, size=(batch, context))).cuda()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    return time.perf_counter() - start


def fmt(value, pattern):
    return "-" if value is None else pattern.format(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=24, help="fewer layers for a quick smoke run")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cp = require_cupy()
    config = JetMoeConfig(**{**EIGHT_B, "num_hidden_layers": args.layers})
    ours = JetMoeForCausalLM(config, device_weights(config, 0), {}, dtype="bfloat16")
    rng = np.random.default_rng()
    rows, results = [], {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "config": EIGHT_B,
                         "layers": args.layers}
    bandwidth = copy_bandwidth()
    bound = bandwidth / active_weight_bytes(config)
    results.update(copy_bandwidth_GBps=bandwidth / 1e9, active_weight_GB=active_weight_bytes(config) / 1e9,
                   decode_bound_tokens_per_s=bound)
    hf = None
    if not args.no_hf:
        try:
            hf = hf_model_from(ours, config)
        except Exception as e:  # the baseline is optional; say why it is missing instead of failing the report
            results["hf_error"] = repr(e)
    prompt = rng.integers(0, config.vocab_size, size=(1, args.prefill))
    t_ours = timed(lambda: ours(input_ids=prompt, use_cache=False, logits_to_keep=1), args.repeats)
    row = {"workload": f"prefill 1x{args.prefill}", "ours_tokens_per_s": args.prefill / t_ours}
    if hf is not None:
        import torch
        ids = torch.from_numpy(prompt).cuda()
        with torch.no_grad():
            t_hf = timed(lambda: hf(input_ids=ids, use_cache=False, logits_to_keep=1), args.repeats)
        row["hf_tokens_per_s"] = args.prefill / t_hf
    rows.append(row)
    for batch in [int(b) for b in args.batches.split(",")]:
        t_ours = ours_decode(ours, batch, args.context, args.steps, rng)
        row = {"workload": f"decode batch {batch}, context {args.context}",
               "ours_tokens_per_s": batch * args.steps / t_ours}
        if batch == 1:
            row["bound_tokens_per_s"] = bound
        if hf is not None:
            row["hf_tokens_per_s"] = batch * args.steps / hf_decode(hf, batch, args.context, args.steps, rng)
        rows.append(row)
        graphed = dict(row, workload=f"decode batch {batch}, context {args.context}, one CUDA graph a step "
                                "(ids via the host, as generate)",
                       ours_tokens_per_s=batch * args.steps / ours_graph_decode(ours, batch, args.context, args.steps,
                                                                               rng))
        rows.append(graphed)
    results["rows"] = rows
    print(f"Device: {results['device']}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); active weights "
          f"per decode token {active_weight_bytes(config) / 1e9:.2f} GB; layers {args.layers}")
    print("\n| workload | ours tokens/s | HF eager tokens/s | ours / HF | bandwidth bound tokens/s | ours / bound |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ours_tps, hf_tps, bound_tps = r["ours_tokens_per_s"], r.get("hf_tokens_per_s"), r.get("bound_tokens_per_s")
        cells = [r["workload"], f"{ours_tps:.1f}", fmt(hf_tps, "{:.1f}"), fmt(hf_tps and ours_tps / hf_tps, "{:.2f}"),
                 fmt(bound_tps, "{:.1f}"), fmt(bound_tps and ours_tps / bound_tps, "{:.0%}")]
        print("| " + " | ".join(cells) + " |")
    if "hf_error" in results:
        print(f"\nHF baseline unavailable: {results['hf_error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

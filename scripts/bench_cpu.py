"""CPU benchmark: the float32 NumPy reference against HF transformers eager (torch float32), same run, same threads.

Config "JetMoE-small" (D=1024, L=8, E=8, K=2, H=8, Dh=64, F=2816, V=32000) with random weights shared by both
sides. Measures prefill of 1x512 tokens and decode of 64 tokens with the KV cache at batch 1 (after a 64-token
prompt), then end-to-end greedy generation (`model.generate` against HF's `generate`, 64 new tokens after a
16-token prompt, eos disabled so both make every token) at batch 1 and 8 on JetMoE-small and on the bundled
weights/jetmoe-tiny-shakespeare. Then one training step (forward and backward, `reference.value_and_grad` against
torch autograd on HF's model, loss.backward()) on the bundled model at 16x256 in float32, with the per-router aux
loss of its recipe, and the memory of each side's step: the peak RssAnon (sampled every 10 ms) above the process
with its model loaded, in a fresh process per side (activations, gradients and workspace). Median of repeats;
prints markdown tables of seconds and ratios (HF time / reference time: above 1 means the reference is faster).
Needs the oracle extra (torch, transformers).
"""

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from jetmoe import hf_oracle  # noqa: E402
from jetmoe.cli import PeakMemory, status_bytes  # noqa: E402
from reference import JetMoeConfig, JetMoeForCausalLM, value_and_grad  # noqa: E402
from reference.io.mapped import THREADS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "weights", "jetmoe-tiny-shakespeare")
RECIPE = json.load(open(os.path.join(ROOT, "configs", "jetmoe-tiny-shakespeare.json")))["train"]  # its training
SMALL = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_local_experts=8, num_experts_per_tok=2,
             num_key_value_heads=8, kv_channels=64, intermediate_size=2816, max_position_embeddings=4096)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_decode(model, prompt, steps):
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, np.argmax(out.logits[:, -1], -1)[:, None]
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = np.argmax(out.logits[:, -1], -1)[:, None]
    return time.perf_counter() - start


def hf_decode(model, prompt, steps):
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start


def generation_rows(label, ours, hf_model, args):
    """[(workload, reference s, HF s, new tokens)] of greedy generate at batch 1 and 8; both must agree."""
    rows = []
    ours.config.eos_token_id = None  # every row makes all max_new_tokens tokens on both sides: equal work
    for batch in (1, 8):
        prompt = np.random.default_rng(batch).integers(3, ours.config.vocab_size, size=(batch, 16))
        new = args.generate_tokens

        def run_ours():
            return ours.generate(prompt, max_new_tokens=new)

        def run_hf():
            ids = torch.from_numpy(prompt)
            with torch.no_grad():
                return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                         min_new_tokens=new, do_sample=False, pad_token_id=0)
        # min_new_tokens keeps HF from stopping at eos; the first new tokens must agree, or the work differs
        assert np.array_equal(run_ours()[:, :20], run_hf().numpy()[:, :20]), "greedy tokens differ: unequal work"
        rows.append((f"generate {label}, batch {batch}, {new} new tokens", median_time(run_ours, args.repeats),
                     median_time(run_hf, args.repeats), batch * new))
    return rows


def training_sides(batch, tokens):
    """(reference step, HF step, token count): one training step of the bundled model on batch x tokens random
    windows each, with the per-router aux loss of its recipe; the reference model in float32, HF's in float32 eager."""
    ours = JetMoeForCausalLM.from_pretrained(TINY, dtype=np.float32)
    hf_model = hf_oracle.load_hf(TINY, torch.float32).train()
    ours.config.aux_loss_coef = hf_model.config.aux_loss_coef = RECIPE["aux_loss_coef"]
    ids = np.random.default_rng(0).integers(3, ours.config.vocab_size, size=(batch, tokens))  # both processes alike
    t_ids = torch.from_numpy(ids)

    def run_ours():
        return value_and_grad(ours, ids, ids, output_router_logits=True, aux_loss="per_router")

    def run_hf():
        hf_model.zero_grad(set_to_none=True)
        loss = hf_oracle.hf_loss(hf_model, t_ids, t_ids, None, True, "per_router")
        loss.backward()
        return loss, hf_model

    return run_ours, run_hf, ids.size


def training_step(args):
    """(reference s, HF s, tokens) of one training step; both sides must agree first."""
    run_ours, run_hf, tokens = training_sides(args.train_batch, args.train_tokens)
    out, grads = run_ours()
    loss, hf_model = run_hf()
    # float32 on both sides, different summation orders: the loss agrees to ~1e-6, the gradients to ~1e-4
    assert abs(float(out.loss) - loss.item()) < 1e-4 * loss.item(), (float(out.loss), loss.item())
    for name, p in hf_model.named_parameters():  # a tied lm_head is model.embed_tokens.weight on both sides
        want = p.grad.numpy()
        err = np.abs(grads[name] - want).max() / np.abs(want).max()
        assert err < 1e-3, f"{name}: gradients disagree (rel err {err:.2e}): the timing would compare different work"
    return median_time(run_ours, args.repeats), median_time(run_hf, args.repeats), tokens


def activation_bytes(side, batch, tokens, threads):
    """Peak RssAnon above the resting process during one training step of `side` ("reference" or "hf"), in a fresh
    process: freed memory that an allocator keeps for reuse would hide the next step's peak in this one."""
    torch.set_num_threads(threads)
    run_ours, run_hf, _ = training_sides(batch, tokens)
    step = run_ours if side == "reference" else run_hf
    before = status_bytes("RssAnon")
    with PeakMemory() as peak:
        step()
    return peak.anon - before


def machine_description(threads):
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, {THREADS} reference threads; "
            f"Python {platform.python_version()}, "
            f"NumPy {np.__version__}, torch {torch.__version__}, transformers {hf_oracle.transformers.__version__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--generate-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch's threads (default: the reference's, reference.io.mapped.THREADS)")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-tokens", type=int, default=256)
    args = parser.parse_args()
    hf_oracle.check_versions()
    torch.set_num_threads(args.threads)
    config = JetMoeConfig(**SMALL)
    ours = JetMoeForCausalLM.from_random(config, seed=0, std=0.02, dtype=np.float32)
    hf_model = hf_oracle.hf.JetMoeForCausalLM(hf_oracle.hf_config(config.to_dict())).eval()
    result = hf_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                       for k, v in ours.state_dict().items()}, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result  # tied lm_head
    rng = np.random.default_rng()
    ids = rng.integers(0, config.vocab_size, size=(1, args.prefill_tokens))
    prompt = ids[:, : args.prompt_tokens]
    with torch.no_grad():  # same logits on both sides, or the timing compares different work
        ref_logits = ours(input_ids=ids[:, :32]).logits
        hf_logits = hf_model(input_ids=torch.from_numpy(ids[:, :32])).logits.numpy()
    err = np.abs(ref_logits - hf_logits).max() / np.abs(hf_logits).max()
    assert err < 1e-4, f"reference and HF disagree (rel err {err:.2e}): the benchmark would be meaningless"

    rows = []
    t_ref = median_time(lambda: ours(input_ids=ids, use_cache=False), args.repeats)
    with torch.no_grad():
        t_hf = median_time(lambda: hf_model(input_ids=torch.from_numpy(ids), use_cache=False), args.repeats)
    rows.append((f"prefill 1x{args.prefill_tokens}", t_ref, t_hf, args.prefill_tokens))
    t_ref = statistics.median(reference_decode(ours, prompt, args.decode_tokens) for _ in range(args.repeats))
    t_hf = statistics.median(hf_decode(hf_model, torch.from_numpy(prompt), args.decode_tokens)
                             for _ in range(args.repeats))
    rows.append((f"decode {args.decode_tokens} tokens, batch 1", t_ref, t_hf, args.decode_tokens))
    rows += generation_rows("JetMoE-small", ours, hf_model, args)
    tiny_ours = JetMoeForCausalLM.from_pretrained(TINY, dtype=np.float32)
    tiny_hf = hf_oracle.load_hf(TINY, torch.float32)
    rows += generation_rows("jetmoe-tiny-shakespeare", tiny_ours, tiny_hf, args)
    t_ref, t_hf, tokens = training_step(args)
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        ref_bytes, hf_bytes = (pool.apply(activation_bytes, (side, args.train_batch, args.train_tokens, args.threads))
                               for side in ("reference", "hf"))
    rows.append((f"training step jetmoe-tiny-shakespeare, {args.train_batch}x{args.train_tokens}", t_ref, t_hf,
                 tokens))

    print(f"Machine: {machine_description(args.threads)}")
    print("Models: JetMoE-small (D=1024, L=8, E=8, K=2, H=8, Dh=64, F=2816, V=32000, random weights) and the "
          "bundled jetmoe-tiny-shakespeare, float32\n")
    print("| workload | reference s | HF eager s | reference tokens/s | HF tokens/s | HF time / reference time |")
    print("|---|---|---|---|---|---|")
    for name, r, h, n in rows:
        print(f"| {name} | {r:.3f} | {h:.3f} | {n / r:.1f} | {n / h:.1f} | {h / r:.2f} |")
    print(f"\nMemory of one training step (peak RssAnon above the loaded model: activations, gradients, workspace): "
          f"reference {ref_bytes / 2**20:.0f} MiB, HF eager with autograd {hf_bytes / 2**20:.0f} MiB "
          f"({ref_bytes / tokens / 1024:.1f} and {hf_bytes / tokens / 1024:.1f} KiB a token)")


if __name__ == "__main__":
    main()

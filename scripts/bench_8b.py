"""The 8B on this machine: the reference on the full jetmoe-8b-shaped checkpoint against HF transformers bf16 and
against the machine's own limit, in one run. `make bench-8b`.

Each side runs in a child process under an address-space cap (RLIMIT_AS), so running out of memory is an
error this script reports, never a case for the kernel's OOM killer. Measured per side: load time, a 32-token and
a 512-token prefill, 32 decoded tokens at batch 1 (after the 32-token prompt), peak RssAnon (sampled every 10 ms:
the process's own memory) and peak VmHWM (resident, mapped checkpoint pages included). The limit: bf16 bytes a
decoded token must read (its active weights) over the measured copy bandwidth, and the measured bf16 -> float32
conversion rate, both on THREADS threads. Prints a markdown table; --json writes the numbers too.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jetmoe.cli import PeakMemory  # noqa: E402
from reference.config import JetMoeConfig  # noqa: E402
from reference.counting import active_parameters  # noqa: E402

THREADS = 2
CHECKPOINT = os.path.join(ROOT, "build", "jetmoe-8b-shaped")
PROMPT_TOKENS, LONG_PROMPT_TOKENS, DECODE_TOKENS = 32, 512, 32


def active_bf16_bytes(config):
    """bf16 bytes one decoded token reads: its active weights (reference/counting.py)."""
    return 2 * sum(active_parameters(config).values())


def machine_limit():
    """(copy GB/s, bf16 -> float32 conversion GB/s of bf16, the same into decode blocks GB/s of bf16), each the best
    of 3 over 1 GiB on THREADS threads. The block rate is what a decode step's conversion can reach: each thread
    converts DECODE_BLOCK_BYTES of float32 at a time into its reused buffer (reference/io/mapped.py's converted)."""
    from concurrent.futures import ThreadPoolExecutor
    from reference.io.mapped import DECODE_BLOCK_BYTES, convert, converted
    import ml_dtypes
    src = np.random.default_rng(0).integers(0, 2**16, size=1 << 29, dtype=np.uint16)  # 1 GiB
    copy_out = np.ones_like(src)  # touched: page faults would count as bandwidth otherwise
    float_out = np.ones(src.shape, np.float32)
    parts = np.array_split(np.arange(src.size), THREADS)
    spans = [(p[0], p[-1] + 1) for p in parts]
    pool = ThreadPoolExecutor(THREADS)

    def best(work, nbytes):
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(work, spans))
            seconds.append(time.perf_counter() - start)
        return nbytes / min(seconds) / 1e9

    copy = best(lambda s: np.copyto(copy_out[s[0]:s[1]], src[s[0]:s[1]]), 2 * src.nbytes)  # read + write
    bf16 = src.view(ml_dtypes.bfloat16)
    conversion = best(lambda s: convert(bf16[s[0]:s[1]], float_out[s[0]:s[1]]), src.nbytes)
    block = DECODE_BLOCK_BYTES // 4  # float32 elements

    def into_blocks(span):
        for start in range(span[0], span[1] - block + 1, block):
            converted(bf16[start:start + block], np.float32)

    return copy, conversion, best(into_blocks, src.nbytes // block * block)


def bf16_instructions():
    """Whether this CPU multiplies bf16 natively (avx512_bf16 / amx_bf16). Where it does, torch sends HF's bf16
    matmuls to oneDNN's bf16 kernels (here: faster prefill, slower decode); the reference's float32 math is the same
    either way."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return ", ".join(flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags) or "none"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(load, step, as_ids, seed):
    """load() -> model; step(model, ids [1, T], cache or None) -> (next token [1, 1], cache); as_ids(NumPy) -> ids.
    The same measurements for both sides: load, 32-token prefill, 32 decode steps, 512-token prefill."""
    load_seconds, model = timed(load)
    ids = np.random.default_rng(seed).integers(3, model.config.vocab_size, size=(1, LONG_PROMPT_TOKENS))
    prefill, (token, cache) = timed(lambda: step(model, as_ids(ids[:, :PROMPT_TOKENS]), None))
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        token, cache = step(model, token, cache)
    decode_seconds = time.perf_counter() - start
    long_prefill, _ = timed(lambda: step(model, as_ids(ids), None))
    return dict(load=load_seconds, prefill_32=prefill, prefill_512=long_prefill,
                decode_tokens_per_s=DECODE_TOKENS / decode_seconds)


def child_ours(path, seed):
    from reference import JetMoeForCausalLM

    def step(model, ids, cache):
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        return np.argmax(out.logits[:, -1], -1)[:, None], out.past_key_values

    with PeakMemory() as peak:
        result = measure(lambda: JetMoeForCausalLM.from_pretrained(path), step, lambda ids: ids, seed)
    return dict(result, peak_anon=peak.anon, peak_resident=peak.resident)


def child_hf(path, seed):
    import torch
    from jetmoe import hf_oracle
    torch.set_num_threads(THREADS)

    def step(model, ids, cache):
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    with PeakMemory() as peak:
        try:
            result = measure(lambda: hf_oracle.load_hf(path, torch.bfloat16), step, torch.from_numpy, seed)
        except (MemoryError, RuntimeError) as error:  # torch reports a failed allocation as RuntimeError
            result = dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return dict(result, peak_anon=peak.anon, peak_resident=peak.resident)


def run_child(side, path, seed, cap_bytes, **extra_env):
    """One side in a fresh process limited to cap_bytes of address space, with extra_env set; its result dict, or
    the failure."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS), **extra_env)
    done = subprocess.run([sys.executable, __file__, "--child", side, "--checkpoint", path, "--seed", str(seed)],
                          capture_output=True, text=True, preexec_fn=limit, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=f"exit {done.returncode} under a {cap_bytes / 2**30:.0f} GiB cap: {last[:200]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def warm_page_cache(path):
    """Read every shard once, so the first side does not pay the disk and the second the page cache."""
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def gb(value):
    return f"{value / 1e9:.2f}"


def table(results, config, copy, conversion, block_conversion):
    active = active_bf16_bytes(config)
    bound = copy * 1e9 / active
    lines = ["| | load s | prefill 32 s | prefill 512 s | decode tokens/s | peak anon GB | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | | {gb(r['peak_anon'])} | {gb(r['peak_resident'])} |"
                         if "peak_anon" in r else f"| {label} | {r['error']} | | | | | |")
        else:
            lines.append(f"| {label} | {r['load']:.2f} | {r['prefill_32']:.1f} | {r['prefill_512']:.1f} | "
                         f"{r['decode_tokens_per_s']:.2f} | {gb(r['peak_anon'])} | {gb(r['peak_resident'])} |")
    lines.append(f"| machine limit | | | | {bound:.2f} | | |")
    notes = [f"decode bound: {gb(active)} GB of active bf16 weights a token over {copy:.1f} GB/s measured copy "
             f"bandwidth ({THREADS} threads); bf16 -> float32 conversion {conversion:.1f} GB/s of bf16, "
             f"{block_conversion:.1f} GB/s into decode blocks"]
    return "\n".join(lines + [""] + notes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=CHECKPOINT, help=f"default {CHECKPOINT} (make_8b_shaped.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--skip-hf", action="store_true", help="measure only the reference and the limit")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps((child_ours if args.child == "ours" else child_hf)(args.checkpoint, args.seed)))
        return
    if not os.path.isfile(os.path.join(args.checkpoint, "model.safetensors.index.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_8b_shaped.py"), "--out",
                        args.checkpoint], check=True)
    config = JetMoeConfig.from_pretrained(args.checkpoint)
    copy, conversion, block_conversion = machine_limit()
    file_bytes = checkpoint_bytes(args.checkpoint)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    warm_page_cache(args.checkpoint)
    # The reference maps the whole checkpoint: its address space is the files plus its own memory.
    results = {"reference (float32 math, bf16 weights in the file)": run_child("ours", args.checkpoint, args.seed,
                                                                               file_bytes + (4 << 30))}
    instructions = bf16_instructions()
    if not args.skip_hf:
        # HF maps the shards and may copy them into its own memory (4.56.2 does not for a bf16 model): the files
        # plus 85% of the RAM.
        hf_cap = file_bytes + int(0.85 * memory)
        results["HF transformers 4.56.2, bf16, eager"] = run_child("hf", args.checkpoint, args.seed, hf_cap)
        if instructions not in ("none", "unknown"):
            # With native bf16 instructions torch sends bf16 matmuls to oneDNN's AVX-512 bf16 kernels: faster at a
            # prefill, slower for the single row of a decode step than what torch picks with oneDNN capped at AVX2.
            # Both are HF as a user may run it, so both are shown.
            results["HF, the same, ONEDNN_MAX_CPU_ISA=AVX2"] = run_child("hf", args.checkpoint, args.seed, hf_cap,
                                                                           ONEDNN_MAX_CPU_ISA="AVX2")
    print(f"{args.checkpoint}: {file_bytes / 1e9:.1f} GB in {config.num_hidden_layers} layers; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB, "
          f"{THREADS} threads, bf16 instructions: {instructions}; {time.strftime('%Y-%m-%d')}")
    print(table(results, config, copy, conversion, block_conversion))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, copy_gb_s=copy, conversion_gb_s=conversion,
                           block_conversion_gb_s=block_conversion, bf16_instructions=instructions,
                           active_bf16_bytes=active_bf16_bytes(config)), f, indent=2)


if __name__ == "__main__":
    main()

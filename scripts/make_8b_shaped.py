"""Write a checkpoint with jetmoe/jetmoe-8b's exact layout and random weights (we have no hub access).

    make 8b-shaped                                                  # build/jetmoe-8b-shaped: all 24 layers, 17 GB
    .venv/bin/python scripts/make_8b_shaped.py --layers 1 --out DIR  # a cut: the first layer's tensors, about 1 GB

Same shapes, HF key names, dtype (bf16), tie and sharding (four shards and model.safetensors.index.json) as the hub
checkpoint, and a Llama-style tokenizer.json of its vocabulary size: D=2048, L=24, E=8, K=2, H=16, Dh=128, F=5632,
V=32000. Its config.json carries the keys of the hub file, including ones only the original JetMoE code reads,
which HF keeps as plain attributes. Every tensor is drawn from a seed derived from its name, so a cut holds exactly
the full checkpoint's tensors for its layers.

Scales: matrices N(0, 0.02), norm weights U(0.8, 1.2), biases N(0, 0.01); routers N(0, 0.1), so that top-k
margins are real (router logits of a few units, not ties). The bf16 values are float32 draws rounded to nearest
even. Needs NumPy and tokenizers (the project's .venv, not torch): CI builds a 1-layer cut for its memory test. Its
first line gives the size and an estimate of the time (from timing one draw), then it checks the free disk space.
A directory already holding the same cut (same layers, complete files) is kept, so the full checkpoint is written
once.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
try:
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from reference.config import JetMoeConfig
    from reference.io.checkpoint import base_parameter_shapes, is_norm_weight
    from reference.io.safetensors import BF16
    from reference.io.safetensors import Writer
except ImportError as error:  # the machine's python3, not the project's environment
    sys.exit(f"error: {error}: run it with the project's environment: make 8b-shaped (or .venv/bin/python "
             f"scripts/make_8b_shaped.py, after make setup)")

DEFAULT_OUT = os.path.join(ROOT, "build", "jetmoe-8b-shaped")
SHARDS = 4
# config.json as the hub has it: HF's JetMoeConfig fields plus keys of the original JetMoE code.
HUB_CONFIG = {
    "activation_function": "silu", "architectures": ["JetMoEForCausalLM"], "aux_loss_coef": 0.01, "bias": True,
    "bos_token_id": 1, "eos_token_id": 2, "glu": True, "hidden_size": 2048, "initializer_range": 0.01,
    "intermediate_size": 5632, "kv_channels": 128, "max_position_embeddings": 4096, "model_type": "jetmoe",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True, "vocab_size": 32000,
    "z_loss_coef": 0.001,
}


def tensor_seed(name):
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def draw(name, shape):
    # -> bf16 bits [shape] uint16, from a generator seeded by the name
    rng = np.random.default_rng(tensor_seed(name))
    if is_norm_weight(name):
        values = rng.uniform(0.8, 1.2, size=shape).astype(np.float32)
    else:
        std = 0.1 if "router" in name else 0.01 if name.endswith("bias") else 0.02
        values = rng.standard_normal(size=shape, dtype=np.float32) * np.float32(std)
    bits = values.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))  # round to nearest even (no NaNs here)
    return (rounded >> 16).astype(np.uint16)


def layout(num_layers):
    # -> [(HF name, shape)] of the causal LM with the first num_layers layers (tied: no lm_head.weight)
    config = JetMoeConfig.from_dict({**HUB_CONFIG, "num_hidden_layers": num_layers})
    return [("model." + name, shape) for name, shape in base_parameter_shapes(config).items()]


def shard_names(tensors):
    # split [(name, shape)] in order into SHARDS groups of about equal bytes -> [[(name, shape)]]
    sizes = [2 * int(np.prod(shape)) for _, shape in tensors]
    target, groups, current, filled = sum(sizes) / SHARDS, [], [], 0
    for (name, shape), size in zip(tensors, sizes):
        current.append((name, shape))
        filled += size
        if filled >= target * (len(groups) + 1) and len(groups) < SHARDS - 1:
            groups.append(current)
            current = []
    groups.append(current)
    return [g for g in groups if g]


def write_shard(path, tensors):
    """Stream one safetensors file: the header first (offsets are known from the shapes), then each tensor."""
    with Writer(path, [(name, BF16, shape) for name, shape in tensors], {"format": "pt"}) as writer:
        for name, shape in tensors:
            writer.write(name, draw(name, shape).view(BF16))


def write_tokenizer(out, vocab_size):
    """A Llama-style tokenizer.json laid out like jetmoe-8b's (<unk> <s> </s> = 0 1 2, the byte tokens
    <0x00>..<0xFF>, then BPE pieces with byte fallback), learned from this repository's README and filled up to
    vocab_size with pieces no merge produces: the vocabulary the hub file has, not its merges (we have no hub)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read().split("\n\n")
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    learner.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                          special_tokens=["<unk>", "<s>", "</s>"]))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        if piece not in vocab and len(vocab) < vocab_size:
            vocab[piece] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"\u2581filler{len(vocab)}"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, [tuple(m) for m in learned["merges"] if "".join(m) in vocab],
                                     unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(os.path.join(out, "tokenizer.json"))


def complete(out, num_layers):
    """True when out already holds this cut: the same config and every shard of its index at full size."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            if json.load(f).get("num_hidden_layers") != num_layers:
                return False
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            index = json.load(f)
        return os.path.isfile(os.path.join(out, "tokenizer.json")) and all(
            os.path.getsize(os.path.join(out, shard)) == size for shard, size in index["shard_sizes"].items())
    except (OSError, ValueError, KeyError):
        return False


def make(out, num_layers):
    if complete(out, num_layers):
        return out
    os.makedirs(out, exist_ok=True)
    groups = shard_names(layout(num_layers))
    weight_map, shard_sizes = {}, {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        print(f"writing {shard}: {len(group)} tensors", flush=True)
        write_shard(os.path.join(out, shard), group)
        weight_map.update({name: shard for name, _ in group})
        shard_sizes[shard] = os.path.getsize(os.path.join(out, shard))
    write_tokenizer(out, HUB_CONFIG["vocab_size"])
    total = checkpoint_bytes(num_layers)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**HUB_CONFIG, "num_hidden_layers": num_layers}, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        # shard_sizes is ours (HF ignores extra keys): it lets a rerun see that the files are complete
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map, "shard_sizes": shard_sizes}, f,
                  indent=2)
    return out


def checkpoint_bytes(num_layers):
    return sum(2 * int(np.prod(shape)) for _, shape in layout(num_layers))


def draw_rate():
    """Bytes of bf16 weights draw() makes per second here: the faster of two draws of a 4 Mi-element tensor (the
    first pays for warming up)."""
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        draw("model.calibration.weight", (2048, 2048))
        seconds.append(time.perf_counter() - started)
    return 2 * 2048 * 2048 / min(seconds)


def check_disk(out, needed):
    """SystemExit naming the shortfall when the file system of out (or its nearest existing parent) cannot take
    `needed` bytes more than out's shards already hold."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    held = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")) \
        if os.path.isdir(out) else 0
    free = shutil.disk_usage(existing).free
    if free + held < needed:
        sys.exit(f"error: {out} needs {needed / 1e9:.1f} GB and {existing} has {(free + held) / 1e9:.1f} GB free: "
                 "free some space or give --out on another disk")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"directory to write (default {DEFAULT_OUT})")
    parser.add_argument("--layers", type=int, default=HUB_CONFIG["num_hidden_layers"],
                        help="how many of the 24 layers to keep (default: all)")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= HUB_CONFIG["num_hidden_layers"]:
        parser.error(f"--layers must be in [1, {HUB_CONFIG['num_hidden_layers']}], got {args.layers}")
    if not complete(args.out, args.layers):
        needed, rate = checkpoint_bytes(args.layers), draw_rate()
        print(f"writing jetmoe-8b-shaped, {args.layers} layer(s), to {args.out}: {needed / 1e9:.1f} GB of bf16 "
              f"weights, about {needed / rate / 60:.0f} min (drawing them at {rate / 1e6:.0f} MB/s here)", flush=True)
        check_disk(args.out, needed)
    print(f"{make(args.out, args.layers)}: jetmoe-8b-shaped, {args.layers} layer(s)")


if __name__ == "__main__":
    main()

"""The fuzz suite: hostile model folders and trace files against the `jetmoe` command (docs/security.md).

Every case copies a small valid model folder, breaks it one way (a class of attack: file types, links out, sizes,
JSON shape, safetensors layout, config values, non-finite weights, trace files), and runs one `jetmoe` command on it
as a subprocess under a 1 GiB address-space cap (RLIMIT_AS, so a read of /dev/zero or of a 2 GB header dies instead
of eating the machine) and a timeout (so a FIFO that hangs the tool fails the case instead of the suite). It must
end with a clear one-line `error: ...` naming the problem (or, for the controls, a correct result), no traceback,
and nothing from the sentinel: every link out of the folder points at a valid file of the same kind whose contents
carry a marker, so a tool that followed it would succeed or print the marker; it must refuse instead.

The cases run two at a time in a thread pool the first time a test asks for its result (the selected cases only),
so the suite costs about as much as its slowest half.
"""

import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reference import JetMoeConfig, JetMoeForCausalLM
from reference.io.trace_files import load_with_metadata

from paths import ROOT, TINY_MODEL

MEMORY_CAP = 1 << 30  # bytes of address space per run: the tools on this small model need about half of it
TIMEOUT = 120  # seconds: a generous bound on a run of a few seconds; only a hang reaches it
SENTINEL = "SENTINEL-5f1c"  # in every file outside the folder that a link may point at
CONFIG = dict(vocab_size=2048, hidden_size=16, num_hidden_layers=2, num_key_value_heads=1, kv_channels=4,
              intermediate_size=8, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)
TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"


# ---------------------------------------------------------------------------------------- the valid inputs

@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A valid model folder, a valid trace of it, a text file and the sentinel files outside the folder."""
    root = tmp_path_factory.mktemp("hostile")
    model = root / "base"
    JetMoeForCausalLM.from_random(JetMoeConfig(**CONFIG), seed=0).save_pretrained(model)
    shutil.copy(os.path.join(TINY_MODEL, "tokenizer.json"), model / "tokenizer.json")
    (model / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    (model / "train_log.json").write_text(json.dumps({"train": {"tokens": 16}}))
    (root / "text.txt").write_text(TEXT)
    from jetmoe.command import main
    assert main(["debug", "dump", str(model), "--prompt", "ROMEO:", "--max-new-tokens", "2",
                 "--out", str(root / "trace.safetensors")]) == 0
    outside = root / "outside"  # valid files, each marked: what a followed link would read
    outside.mkdir()
    config = json.loads((model / "config.json").read_text())
    (outside / "config.json").write_text(json.dumps({**config, "sentinel": SENTINEL}))
    (outside / "train_log.json").write_text(json.dumps({"train": {"tokens": 4}, "sentinel": SENTINEL}))
    (outside / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "sentinel": SENTINEL}))
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = SENTINEL
    (outside / "tokenizer.json").write_text(json.dumps(tokenizer))
    shutil.copy(model / "model.safetensors", outside / "model.safetensors")
    return root


def run_jetmoe(args):
    """(exit status, stdout, stderr) of `python -m jetmoe args` under MEMORY_CAP and TIMEOUT."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", RAYON_NUM_THREADS="1", PYTHONPATH=ROOT)
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "jetmoe", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT, preexec_fn=limit, env=env)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {TIMEOUT} s"
    print(f"{' '.join(args[:2])}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    return done.returncode, done.stdout, done.stderr


# ------------------------------------------------------------------------------ raw files the cases write

def raw_safetensors(path, header, data=b""):
    """A safetensors file with exactly this header (a dict, or bytes as they are) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def sparse(path, size, prefix=b""):
    """A file of `size` bytes that takes no disk: prefix, then a hole."""
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(size)


def header_of(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), f.read()


def deep(depth):
    return "[" * depth + "]" * depth


def edit_config(model, **values):
    config = json.loads((model / "config.json").read_text())
    config.update(values)
    (model / "config.json").write_text(json.dumps(config))


def edit_tensor(model, name, change):
    """Rewrite model.safetensors with tensor `name` changed in place by change(array)."""
    header, data = header_of(model / "model.safetensors")
    begin, end = header[name]["data_offsets"]
    values = np.frombuffer(data[begin:end], np.float32).copy()
    change(values)
    raw_safetensors(model / "model.safetensors", header, data[:begin] + values.tobytes() + data[end:])


def shard(model, names_per_shard):
    """Split model.safetensors into shards of the given tensor names; returns the index's weight_map."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(model / "model.safetensors"))
    os.remove(model / "model.safetensors")
    weight_map = {}
    for i, names in enumerate(names_per_shard(sorted(tensors))):
        file = f"model-{i:05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(model / file))
        weight_map.update({n: file for n in names})
    return weight_map


def write_index(model, text):
    (model / "model.safetensors.index.json").write_text(text)


def two_shards(model):
    weight_map = shard(model, lambda names: [names[: len(names) // 2], names[len(names) // 2:]])
    write_index(model, json.dumps({"weight_map": weight_map}))
    return weight_map


def edit_trace(root, out, change, metadata_change=None):
    """A copy of the valid trace with its tensors changed by change(dict) (and its metadata by metadata_change)."""
    from reference.io.trace_files import Trace
    trace, metadata = load_with_metadata(str(root / "trace.safetensors"))
    tensors = {n: np.array(v) for n, v in trace.items()}
    change(tensors)
    metadata = {k: v for k, v in metadata.items() if k != "order"}
    if metadata_change:
        metadata_change(metadata)
    Trace(tensors).save(str(out), metadata)
    return out


# ---------------------------------------------------------------------------------------------- the cases

def generate(model):
    return ["generate", "--model", str(model), "--prompt", "ROMEO:", "--max-new-tokens", "3", "--temperature", "0",
            "--no-stats"]


def generate_on_the_twin(model):  # the GPU twin (on the CPU emulator where there is no GPU)
    return generate(model) + ["--device", "gpu"]


def evaluate(model):
    return ["evaluate", "--model", str(model), "--text-file", str(model.parent / "text.txt")]


def compare(model, trace=None, *flags):
    return ["debug", "compare", str(model), str(trace or model.parent / "trace.safetensors"), *flags]


def fifo(name, command=generate):
    def build(model, root):
        os.remove(model / name) if (model / name).exists() else None
        os.mkfifo(model / name)
        return command(model)
    return build


def link(name, target, command=generate):
    """name in the folder becomes a link to `target`: a path, or a name in root/outside (the sentinel)."""
    def build(model, root):
        os.remove(model / name) if (model / name).exists() else None
        os.symlink(target if target.startswith("/") else root / "outside" / target, model / name)
        return command(model)
    return build


def oversize(name, size, command=generate, prefix=b"{"):
    def build(model, root):
        sparse(model / name, size, prefix)
        return command(model)
    return build


def config_values(command=generate, **values):
    def build(model, root):
        edit_config(model, **values)
        return command(model)
    return build


def config_text(text, command=generate):
    def build(model, root):
        (model / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        return command(model)
    return build


def header(change):
    """model.safetensors with its header changed: change(header dict, data bytes) -> (header, data)."""
    def build(model, root):
        raw_safetensors(model / "model.safetensors", *change(*header_of(model / "model.safetensors")))
        return generate(model)
    return build


def overlap(h, data):  # the second tensor (by offset) starts inside the first: both read the same bytes
    names = sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"])
    first, second = names[0], names[1]
    size = h[second]["data_offsets"][1] - h[second]["data_offsets"][0]
    h[second]["data_offsets"] = [h[first]["data_offsets"][1] - 4, h[first]["data_offsets"][1] - 4 + size]
    return h, data


def gap(h, data):  # every tensor 8 bytes later, 8 unused bytes first
    shifted = {n: dict(e, data_offsets=[o + 8 for o in e["data_offsets"]]) for n, e in h.items() if n != "__metadata__"}
    return shifted, b"\0" * 8 + data


def duplicate_name(h, data):
    text = json.dumps(h)
    name = next(n for n in h if n != "__metadata__")
    entry = json.dumps(h[name])
    return text[:-1].encode() + f', "{name}": {entry}}}'.encode(), data


def norm(i=0):
    return f"model.layers.{i}.input_layernorm.weight"


def weight_values(name, value, command=generate):
    def build(model, root):
        edit_tensor(model, name, lambda a: a.__setitem__(len(a) // 2, value))
        return command(model)
    return build


def trace_case(change=lambda t: None, metadata_change=None, flags=()):
    def build(model, root):
        return compare(model, edit_trace(root, root / f"trace-{model.name}.safetensors", change, metadata_change),
                       *flags)
    return build


def set_tensor(name, value):
    return lambda t: t.__setitem__(name, value)


def index_cases(build_index):
    def build(model, root):
        weight_map = two_shards(model)
        write_index(model, build_index(weight_map))
        return generate(model)
    return build


def many_shards(model, root):
    """60,000 names in the index, each in its own listed shard, all but the real ones missing: one pass finds it."""
    weight_map = two_shards(model)
    weight_map.update({f"model.extra.{i}.weight": f"extra-{i:05d}.safetensors" for i in range(60_000)})
    write_index(model, json.dumps({"weight_map": weight_map}))
    return generate(model)


def inside_link(model, root):
    """Control: a link to a file inside the folder is followed."""
    os.replace(model / "model.safetensors", model / "weights.bin")
    os.symlink("weights.bin", model / "model.safetensors")
    return generate(model)


def huge_trace(model, root):
    """A trace of 20,000 tokens: past max_position_embeddings (64); refused before any allocation."""
    ids = np.zeros((1, 20_000), np.int64)
    path = root / f"trace-{model.name}.safetensors"
    from reference.io.trace_files import Trace
    Trace({"inputs.input_ids": ids, "inputs.attention_mask": np.ones_like(ids)}).save(str(path))
    return compare(model, path)


def trace_fifo(model, root):
    os.mkfifo(root / f"trace-{model.name}.safetensors")
    return compare(model, root / f"trace-{model.name}.safetensors")


def raw_trace(make):
    def build(model, root):
        path = root / f"trace-{model.name}.safetensors"
        make(path)
        return compare(model, path)
    return build


def dump_nan(model, root):
    edit_tensor(model, norm(1), lambda a: a.__setitem__(0, np.nan))
    return ["debug", "dump", str(model), "--prompt", "ROMEO:", "--out", str(root / f"dump-{model.name}.safetensors")]


OK = "ok"
CASES = {
    # ---- file types: a FIFO must not hang, a directory is not a file, a device is never read
    "fifo-config": (fifo("config.json"), r"config.json is a FIFO, not a regular file"),
    "fifo-weights": (fifo("model.safetensors"), r"model.safetensors is a FIFO"),
    "fifo-tokenizer": (fifo("tokenizer.json"), r"tokenizer.json is a FIFO"),
    "fifo-tokenizer-config": (fifo("tokenizer_config.json"), r"tokenizer_config.json is a FIFO"),
    "fifo-train-log": (fifo("train_log.json", evaluate), r"train_log.json is a FIFO"),
    "fifo-text-file": (lambda m, r: (os.mkfifo(m / "text.fifo"),
                                     evaluate(m)[:-1] + [str(m / "text.fifo")])[-1], r"text.fifo is a FIFO"),
    "fifo-config-compare": (fifo("config.json", compare), r"config.json is a FIFO"),
    "directory-config": (lambda m, r: (os.remove(m / "config.json"), os.mkdir(m / "config.json"),
                                       generate(m))[-1], r"config.json is a directory"),
    # ---- links out of the folder: to a valid marked file, to /dev/zero, to /proc; a link inside is followed
    "link-out-config": (link("config.json", "config.json"), r"leads outside the model directory"),
    "link-out-weights": (link("model.safetensors", "model.safetensors"), r"leads outside the model directory"),
    "link-out-tokenizer": (link("tokenizer.json", "tokenizer.json"), r"leads outside the model directory"),
    "link-out-tokenizer-config": (link("tokenizer_config.json", "tokenizer_config.json"), r"leads outside"),
    "link-out-train-log": (link("train_log.json", "train_log.json", evaluate), r"leads outside the model directory"),
    "link-out-config-compare": (link("config.json", "config.json", compare), r"leads outside the model directory"),
    "link-dev-zero-config": (link("config.json", "/dev/zero"), r"leads outside the model directory"),
    "link-dev-zero-weights": (link("model.safetensors", "/dev/zero"), r"leads outside the model directory"),
    "link-dev-zero-train-log": (link("train_log.json", "/dev/zero", evaluate), r"leads outside"),
    "link-proc": (link("tokenizer.json", "/proc/self/environ"), r"leads outside the model directory"),
    "link-dangling": (link("config.json", "/nonexistent/config.json"), r"leads outside|does not exist"),
    "link-inside": (inside_link, OK),
    "index-escape": (index_cases(lambda w: json.dumps({"weight_map": {**w, next(iter(w)): "../outside/x"}})),
                     r"is not a file name inside the model directory"),
    "index-absolute": (index_cases(lambda w: json.dumps({"weight_map": {**w, next(iter(w)): "/etc/passwd"}})),
                       r"is not a file name inside the model directory"),
    # ---- sizes: each kind of file has a cap, checked before reading (sparse files: no disk used)
    "big-config": (oversize("config.json", 50 << 20), r"config.json is 52,428,800 bytes, over the .*-byte cap"),
    "big-tokenizer": (oversize("tokenizer.json", 2 << 30), r"tokenizer.json is .* bytes, over the .*-byte cap"),
    "big-tokenizer-config": (oversize("tokenizer_config.json", 1 << 30), r"over the .*-byte cap"),
    "big-train-log": (oversize("train_log.json", 1 << 30, evaluate), r"train_log.json is .* over the .*-byte cap"),
    "big-header": (lambda m, r: (sparse(m / "model.safetensors", 300_000_000, struct.pack("<Q", 200_000_000)),
                                 generate(m))[-1], r"claims 200,000,000 bytes, over the 100,000,000-byte cap"),
    "header-claims-2^63": (lambda m, r: (raw_safetensors(m / "model.safetensors", b"x" * 8),
                                         open(m / "model.safetensors", "r+b").write(struct.pack("<Q", 2**63)),
                                         generate(m))[-1], r"over the 100,000,000-byte cap"),
    "big-index": (lambda m, r: (two_shards(m), sparse(m / "model.safetensors.index.json", 1 << 30, b"{"),
                                generate(m))[-1], r"index.json is .* over the .*-byte cap"),
    # ---- JSON: nesting (Python's parser recurses), duplicate keys, bad UTF-8, numbers past float or 4300 digits
    "deep-config": (config_text("{\"a\": " + deep(100_000) + "}"), r"config.json: JSON nested deeper than 64"),
    "deep-config-within-recursion": (config_text("{\"a\": " + deep(500) + "}"), r"nested deeper than 64"),
    "deep-tokenizer-config": (lambda m, r: ((m / "tokenizer_config.json").write_text(deep(100_000)),
                                            generate(m))[-1], r"tokenizer_config.json: JSON nested deeper"),
    "deep-train-log": (lambda m, r: ((m / "train_log.json").write_text(deep(100_000)), evaluate(m))[-1],
                       r"train_log.json: JSON nested deeper"),
    "deep-index": (index_cases(lambda w: deep(100_000)), r"index.json: JSON nested deeper"),
    "deep-header": (header(lambda h, d: (("[" * 50_000 + "]" * 50_000).encode(), d)), r"JSON nested deeper"),
    "deep-tokenizer": (lambda m, r: ((m / "tokenizer.json").write_text("{\"model\": " + deep(100_000) + "}"),
                                     generate(m))[-1], r"tokenizer.json is not a valid tokenizer.json"),
    "duplicate-config-key": (config_text(b'{"vocab_size": 2048, "vocab_size": 4096}'),
                             r"config.json: the key 'vocab_size' appears twice"),
    "config-not-utf8": (config_text(b'{"a": "\xff"}'), r"config.json is not UTF-8 text: byte 0xff"),
    "config-1e400": (config_values(rms_norm_eps=1e400), r"rms_norm_eps must be a finite number, got inf"),
    "config-long-int": (config_text('{"vocab_size": ' + "9" * 5000 + "}"), r"config.json is not valid JSON"),
    "config-long-string": (config_values(activation_function="x" * 2_000_000),
                           r"activation_function='x{60}'\.\.\. \(2,000,000 characters\) is not supported"),
    # ---- safetensors layout: as strict as the library
    "header-duplicate-name": (header(duplicate_name), r"appears twice in one object"),
    "header-overlap": (header(overlap), r"tensors must follow each other without overlap"),
    "header-gap": (header(gap), r"the data starts at 0: tensors must follow each other without gap"),
    "header-trailing-data": (header(lambda h, d: (h, d + b"\0" * 16)), r"the tensors cover \d+ bytes of data, but"),
    "header-shape-mismatch": (header(lambda h, d: ({**h, norm(): dict(h[norm()], shape=[17])}, d)),
                              r"needs 68 bytes, header gives offsets"),
    "header-100-dims": (header(lambda h, d: ({**h, norm(): dict(h[norm()], shape=[1] * 100)}, d)),
                        r"has 100 dimensions, more than 64"),
    "header-negative-offset": (header(lambda h, d: ({**h, norm(): dict(h[norm()], data_offsets=[-64, 0])}, d)),
                               r"malformed header entry"),
    "header-bool-shape": (header(lambda h, d: ({**h, norm(): dict(h[norm()], shape=[True] * 16)}, d)),
                          r"malformed header entry"),
    "header-unknown-dtype": (header(lambda h, d: ({**h, norm(): dict(h[norm()], dtype="F8_E4M3")}, d)),
                             r"unsupported dtype F8_E4M3"),
    "header-metadata-not-strings": (header(lambda h, d: ({**h, "__metadata__": {"format": ["pt"]}}, d)),
                                    r"__metadata__ must map strings to strings"),
    "header-long-name": (header(lambda h, d: ({"y" * 10_000_000: dict(h[norm()], dtype="F8_E4M3"), **h}, d)),
                         r"tensor 'y{60}'\.\.\. \(10,000,000 characters\) has unsupported dtype F8_E4M3"),
    "index-duplicate-name": (index_cases(lambda w: json.dumps({"weight_map": w})[:-2]
                                         + f', "{next(iter(w))}": "{w[next(iter(w))]}"}}}}'),
                             r"appears twice in one object"),
    "index-not-strings": (index_cases(lambda w: json.dumps({"weight_map": {**w, next(iter(w)): 3}})),
                          r"weight_map must map tensor names to shard file names"),
    "index-60000-shards": (many_shards, r"lists shard 'extra-00000.safetensors', which is missing"),
    # ---- config values: types and finiteness, token ids in range (never an OverflowError)
    "config-eps-inf": (config_text(b'{"rms_norm_eps": Infinity}'), r"rms_norm_eps must be a finite number, got inf"),
    "config-theta-inf": (config_values(rope_theta=float("inf"), rope_parameters=dict(rope_type="default",
                                                                                rope_theta=float("inf"))),
                         r"rope_theta must be a finite number, got inf"),
    "config-theta-nan": (config_values(rope_theta=float("nan"), rope_parameters=dict(rope_type="default",
                                                                                rope_theta=float("nan"))),
                         r"rope_theta must be a finite number, got nan"),
    "config-aux-nan": (config_values(aux_loss_coef=float("nan")), r"aux_loss_coef must be a finite number"),
    "config-tie-string": (config_values(tie_word_embeddings="false"),
                          r"tie_word_embeddings must be true or false \(a JSON boolean\), got 'false'"),
    "config-cache-int": (config_values(use_cache=1), r"use_cache must be true or false"),
    "config-eps-string": (config_values(rms_norm_eps="1e-6"), r"rms_norm_eps must be a finite number, got '1e-6'"),
    "config-bos-negative": (config_values(bos_token_id=-1), r"bos_token_id=-1 is outside \[0, 2048\)"),
    "config-eos-2^40": (config_values(eos_token_id=2**40), r"eos_token_id=1099511627776 is outside \[0, 2048\)"),
    "config-eos-list-2^70": (config_values(eos_token_id=[1, 2**70]), r"eos_token_id=1180591620717411303424 is out"),
    "config-pad-float": (config_values(pad_token_id=1.5), r"pad_token_id must be None or an integer, got 1.5"),
    "config-vocab-2^40": (config_values(vocab_size=2**40), r"vocab_size must be a positive integer, got 1099511627776"),
    "config-layers-10^9": (config_values(num_hidden_layers=10**9), r"num_hidden_layers=1000000000 is over 65536"),
    "config-size-string": (config_values(hidden_size="16"), r"hidden_size must be a positive integer, got '16'"),
    "config-list": (config_text("[1, 2]"), r"config.json must hold a JSON object, got list"),
    "config-wide-deep-value": (config_values(rope_scaling={"type": "yarn", "x": json.loads(
        "[" * 60 + ",".join(["0"] * 100_000) + "]" * 60)}),
        r"rope_scaling=\{'type': 'yarn', 'x': \[\[\[\.\.\.\]\]\]\}"),
    "train-log-tokens-string": (lambda m, r: ((m / "train_log.json").write_text('{"train": {"tokens": "8"}}'),
                                              evaluate(m))[-1], r"train.tokens must be an integer >= 2, got '8'"),
    # ---- non-finite numbers: refused at load, or named where they first appear
    "weight-nan-generate": (weight_values(norm(1), np.nan), rf"tensor '{norm(1)[6:]}' holds nan at index \[8\]"),
    "weight-inf-evaluate": (weight_values("model.embed_tokens.weight", np.inf, evaluate), r"holds inf at index"),
    "weight-nan-compare": (weight_values(norm(0), np.nan, compare), r"holds nan at index"),
    "weight-inf-gpu-twin": (weight_values(norm(1), np.inf, generate_on_the_twin), r"holds inf at index"),
    # the final norm's weight 3e38 at feature 8 (finite, so loading takes it) overflows the norm's output there
    "overflow-generate": (weight_values("model.norm.weight", 3e38),
                          r"logits of generate's forward 0 .* hold NaN or inf: the first non-finite value appears at "
                          r"trace point norm at index \(0, \d+, 8\)"),
    "overflow-evaluate": (weight_values("model.norm.weight", 3e38, evaluate),
                          r"the loss is (nan|inf): window 0 .* first at trace point norm at index \(0, \d+, 8\)"),
    "dump-nan-says-so": (dump_nan, r"warning: the trace holds NaN or inf, written as computed; the first is at trace "
                                   r"point layers.1.input_layernorm"),
    # ---- trace files: untrusted too
    "trace-fifo": (trace_fifo, r"is a FIFO, not a regular file"),
    "trace-float16": (trace_case(lambda t: t.__setitem__("layers.0.input_layernorm",
                                                         t["layers.0.input_layernorm"].astype(np.float16))),
                      r"tensor 'layers.0.input_layernorm' is float16; a trace holds bfloat16, float32, float64"),
    "trace-metadata-float16": (trace_case(metadata_change=lambda m: m.__setitem__("dtype", "float16")),
                               r"its metadata says dtype 'float16'"),
    "trace-token-out-of-range": (trace_case(lambda t: t["inputs.input_ids"].__setitem__((0, 0), 10**6)),
                                 r"inputs.input_ids holds 1000000, outside \[0, 2048\)"),
    "trace-token-negative": (trace_case(lambda t: t["inputs.input_ids"].__setitem__((0, 0), -5)),
                             r"inputs.input_ids holds -5, outside"),
    "trace-float-ids": (trace_case(lambda t: t.__setitem__("inputs.input_ids", t["inputs.input_ids"] + 0.5)),
                        r"inputs.input_ids must be a 2-D integer tensor"),
    "trace-3d-ids": (trace_case(lambda t: t.__setitem__("inputs.input_ids", t["inputs.input_ids"][None])),
                     r"inputs.input_ids must be a 2-D integer tensor, got shape \[1, 1, \d+\]"),
    "trace-mask-shape": (trace_case(lambda t: t.__setitem__("inputs.attention_mask",
                                                            t["inputs.attention_mask"][:, 1:])),
                         r"inputs.attention_mask has shape \[1, \d+\], expected"),
    "trace-step-shape": (trace_case(lambda t: t.__setitem__("step.1.inputs.input_ids", np.zeros((1, 3), np.int64))),
                         r"step.1.inputs.input_ids has shape \[1, 3\], expected \[1, 1\]"),
    "trace-expert-out-of-range": (trace_case(lambda t: t["layers.0.mlp.router.top_k_indices"].__setitem__(
        (0, 0), 7), flags=("--isolate",)), r"layers.0.mlp.router.top_k_indices holds 7, outside \[0, 2\)"),
    "trace-expert-float": (trace_case(lambda t: t.__setitem__("layers.1.attention.router.top_k_indices", t[
        "layers.1.attention.router.top_k_indices"].astype(np.float32)), flags=("--isolate",)),
        r"top_k_indices must be a 2-D integer tensor"),
    "trace-20000-tokens": (huge_trace, r"runs on 20000 tokens, more than max_position_embeddings=64"),
    "trace-overlap": (raw_trace(lambda p: raw_safetensors(p, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))), r"without overlap"),
    "trace-big-header": (raw_trace(lambda p: sparse(p, 300_000_000, struct.pack("<Q", 250_000_000))),
                         r"over the 100,000,000-byte cap"),
    "trace-truncated": (raw_trace(lambda p: open(p, "wb").write(b"\x01\x02")), r"truncated safetensors file"),
    # ---- controls: the valid folder and trace work (so the refusals above are not refusals of everything)
    "valid-generate": (lambda m, r: generate(m), OK),
    "valid-evaluate": (lambda m, r: evaluate(m), OK),
    "valid-compare-isolate": (lambda m, r: compare(m, None, "--isolate"), OK),
}


@pytest.fixture(scope="session")
def results(base, request):
    """case id -> (exit status, stdout, stderr), for the cases this session selected, run two at a time."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.originalname == "test_hostile_input" and hasattr(item, "callspec")]

    def one(case):
        model = base / case
        shutil.copytree(base / "base", model)
        return case, run_jetmoe(CASES[case][0](model, base))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, selected))


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(case, results):
    status, out, err = results[case]
    expected = CASES[case][1]
    assert status is not None, f"{case}: {err}"  # it ended within TIMEOUT: nothing hangs
    assert "Traceback" not in err, err
    assert SENTINEL not in out + err, (out, err)  # nothing outside the folder was read into the result
    if expected == OK:
        assert status == 0, err
        return
    lines = [line for line in err.splitlines() if line.strip()]
    if case == "dump-nan-says-so":
        assert status == 2 and re.search(expected, err), err
        return
    assert status == 1, (status, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one line: no echo of a huge value
    assert len(lines[0]) < 600, lines[0][:600]
    assert re.search(expected, lines[0]), lines[0]


def test_a_trace_whose_activations_would_not_fit_is_refused(base):
    # The memory bound of check_trace_file, in-process with a small `available` (a subprocess would need a trace
    # larger than this machine's memory): the valid trace (some 40 KB of activations) fits the real memory, not 1 KiB.
    from reference.io.trace_files import check_trace_file
    trace, metadata = load_with_metadata(str(base / "trace.safetensors"))
    config = JetMoeConfig.from_pretrained(str(base / "base"))
    check_trace_file(trace, metadata, config, "trace", 4)  # control
    with pytest.raises(ValueError, match=r"trace: a trace of its 1 x \d+ tokens needs about 0.0 GiB of activations, "
                                         r"more than the 0.0 GiB available"):
        check_trace_file(trace, metadata, config, "trace", 4, available=1 << 10)

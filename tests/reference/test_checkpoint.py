"""Rung 10 of the ladder (tests/reference/helpers.py lists them): checkpoints.

Save/load round trips, the HF layouts (prefixes, tied lm_head, shards, F16/BF16/F32 files), memory mapping, errors
that name the tensor or file at fault, and (oracle) loading in transformers.

Every test draws fresh random weights and inputs (the seed is printed, so a failure can be replayed). Loading
what was saved runs the same operations on the same numbers, so those comparisons are exact (tolerance 0).
"""

import json
import os
import re
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from reference import CheckpointError, JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel
from reference.io.safetensors import SafetensorsError, read_safetensors

V, D = 40, 24
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def small_config(**overrides):
    values = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_key_value_heads=2, kv_channels=6,
                  intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
                  pad_token_id=0, num_labels=3)
    values.update(overrides)
    return JetMoeConfig(**values)


def random_ids(rng, batch=2, tokens=7):
    return rng.integers(1, V, size=(batch, tokens))  # 0 is the pad token


def outputs(model, ids):
    out = model(ids)
    return out.last_hidden_state if isinstance(model, JetMoeModel) else out.logits


def untied_causal_lm(seed, dtype=np.float64, **overrides):
    """An untied CausalLM: its file holds every tensor a CausalLM checkpoint can hold, lm_head.weight included."""
    return JetMoeForCausalLM.from_random(small_config(tie_word_embeddings=False, **overrides), seed=seed, dtype=dtype)


def strip(name):
    return name[len("model."):] if name.startswith("model.") else name


def file_keys(path):
    with safe_open(str(path), framework="numpy") as f:
        return set(f.keys())


def save_tensors(path, config, tensors):
    """A checkpoint directory written with the safetensors library itself (config.json + model.safetensors)."""
    config.save_pretrained(path)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def write_raw_safetensors(path, tensors, header=None):
    """The safetensors format by hand: 8-byte little-endian header length, JSON header
    {name: {dtype, shape, data_offsets}} (space-padded to 8 bytes), then the data. tensors: {name: (dtype name,
    array)}; the arrays' native bytes are written (this machine is little-endian, as the format). `header`
    replaces the JSON header's bytes, to write corrupt files."""
    entries, chunks, offset = {}, [], 0
    for name, (dtype_name, array) in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        entries[name] = {"dtype": dtype_name, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(entries).encode() if header is None else header
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        f.writelines(chunks)


def read_raw_header(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def write_sharded(path, config, state, rng):
    """Two shards of a random split of `state`, listed in model.safetensors.index.json as HF writes them."""
    names = sorted(state)
    rng.shuffle(names)
    cut = int(rng.integers(1, len(names)))
    config.save_pretrained(path)
    weight_map = {}
    for shard, keys in zip(SHARDS, (names[:cut], names[cut:])):
        save_file({k: np.ascontiguousarray(state[k]) for k in keys}, os.path.join(path, shard),
                  metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return weight_map


def assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def backing_memmap(array):
    """The file-backed np.memmap an array's memory comes from (following .base), or None. (A converted copy of a
    memmap, e.g. from astype, is also an np.memmap instance, but with no file: filename None.)"""
    while array is not None:
        if isinstance(array, np.memmap) and array.filename is not None:
            return array
        array = array.base if isinstance(array, np.ndarray) else None
    return None


# ---------------------------------------------------------------- round trips

MODELS = {
    "causal_lm_tied": (JetMoeForCausalLM, dict(tie_word_embeddings=True)),
    "causal_lm_untied": (JetMoeForCausalLM, dict(tie_word_embeddings=False)),
    "sequence_classification": (JetMoeForSequenceClassification, {}),
    "base": (JetMoeModel, {}),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_round_trip(seed, rng, tmp_path, kind, dtype):
    cls, overrides = MODELS[kind]
    model = cls.from_random(small_config(**overrides), seed=seed, dtype=dtype)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert_same_state(load_file(os.path.join(tmp_path, "model.safetensors")), model.state_dict())
    ids = random_ids(rng)
    np.testing.assert_array_equal(outputs(loaded, ids), outputs(model, ids))


# ---------------------------------------------------------------- tied / untied lm_head


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tied_lm_head_is_the_embedding(seed, rng, tmp_path, dtype):
    model = JetMoeForCausalLM.from_random(small_config(tie_word_embeddings=True), seed=seed, dtype=np.float64)
    model.save_pretrained(tmp_path)
    keys = file_keys(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # HF omits a tied head
    loaded = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.lm_head is loaded.model.embed_tokens  # one array, also after a float32 conversion
    out = loaded(random_ids(rng), output_hidden_states=True)
    np.testing.assert_array_equal(out.logits, out.hidden_states[-1] @ loaded.model.embed_tokens.T)


def test_tied_config_ignores_a_stored_lm_head(seed, rng, tmp_path):
    # HF re-ties a tied model after loading, whatever lm_head.weight the file holds
    model = JetMoeForCausalLM.from_random(small_config(tie_word_embeddings=True), seed=seed, dtype=np.float64)
    stale = rng.standard_normal((V, D))
    save_tensors(tmp_path, model.config, {**model.state_dict(), "lm_head.weight": stale})
    loaded = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float64)
    assert loaded.lm_head is loaded.model.embed_tokens
    ids = random_ids(rng)
    np.testing.assert_array_equal(loaded(ids).logits, model(ids).logits)


def test_untied_lm_head_is_stored(seed, rng, tmp_path):
    model = untied_causal_lm(seed)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in file_keys(tmp_path / "model.safetensors")
    loaded = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float64)
    np.testing.assert_array_equal(loaded.lm_head, model.lm_head)
    assert not np.shares_memory(loaded.lm_head, loaded.model.embed_tokens)
    assert not np.array_equal(loaded.lm_head, loaded.model.embed_tokens)  # random: the two differ
    out = loaded(random_ids(rng), output_hidden_states=True)
    np.testing.assert_array_equal(out.logits, out.hidden_states[-1] @ model.lm_head.T)


# ---------------------------------------------------------------- base model, prefixes


def _causal_lm_checkpoint(seed, path, tie):
    model = JetMoeForCausalLM.from_random(small_config(tie_word_embeddings=tie), seed=seed, dtype=np.float64)
    model.save_pretrained(path)
    return model.model


def _seqcls_checkpoint(seed, path):
    model = JetMoeForSequenceClassification.from_random(small_config(), seed=seed, dtype=np.float64)
    model.save_pretrained(path)
    return model.model


def _transformer_prefix_checkpoint(seed, path):
    # JetMoePreTrainedModel.base_model_prefix is "transformer"
    model = untied_causal_lm(seed)
    state = {("transformer." + n[len("model."):] if n.startswith("model.") else n): t
             for n, t in model.state_dict().items()}
    save_tensors(path, model.config, state)
    return model.model


BASE_SOURCES = {
    "causal_lm_untied": lambda seed, path: _causal_lm_checkpoint(seed, path, tie=False),
    "causal_lm_tied": lambda seed, path: _causal_lm_checkpoint(seed, path, tie=True),
    "sequence_classification": _seqcls_checkpoint,
    "transformer_prefix": _transformer_prefix_checkpoint,
}


@pytest.mark.parametrize("source", sorted(BASE_SOURCES))
def test_base_model_loads_head_checkpoints(seed, rng, tmp_path, source):
    original = BASE_SOURCES[source](seed, tmp_path)  # the JetMoeModel inside the saved model
    base = JetMoeModel.from_pretrained(tmp_path, dtype=np.float64)
    assert_same_state(base.state_dict(), original.state_dict())  # no "model." prefix, no head tensor
    ids = random_ids(rng)
    np.testing.assert_array_equal(base(ids).last_hidden_state, original(ids).last_hidden_state)


def test_causal_lm_loads_base_checkpoint(seed, rng, tmp_path):
    # prefix-free names (a JetMoeModel file) fill a tied CausalLM, whose lm_head is the embedding
    base = JetMoeModel.from_random(small_config(tie_word_embeddings=True), seed=seed, dtype=np.float64)
    base.save_pretrained(tmp_path)
    causal = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float64)
    ids = random_ids(rng)
    np.testing.assert_array_equal(causal.model(ids).last_hidden_state, base(ids).last_hidden_state)
    assert causal.lm_head is causal.model.embed_tokens


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize("cls", [JetMoeForCausalLM, JetMoeModel])
def test_sharded_checkpoint(seed, rng, tmp_path, cls):
    model = untied_causal_lm(seed)
    weight_map = write_sharded(tmp_path, model.config, model.state_dict(), rng)
    assert not os.path.exists(tmp_path / "model.safetensors") and set(weight_map.values()) == set(SHARDS)
    loaded = cls.from_pretrained(tmp_path, dtype=np.float64)
    want = model if cls is JetMoeForCausalLM else model.model
    assert_same_state(loaded.state_dict(), want.state_dict())
    ids = random_ids(rng)
    np.testing.assert_array_equal(outputs(loaded, ids), outputs(want, ids))


# A checkpoint directory is untrusted: no name in it (an index's shard, a link) may make the loader read outside it.

def shard_moved_out(tmp_path, model, rng, shard_name):
    """A sharded checkpoint in tmp_path/model whose index names its first shard `shard_name` (a path out of the
    directory) where a valid copy of that shard now lies, so only the path check can stop the load."""
    directory = tmp_path / "model"
    directory.mkdir()
    weight_map = write_sharded(directory, model.config, model.state_dict(), rng)
    outside = tmp_path / "outside.safetensors"
    os.replace(directory / SHARDS[0], outside)
    index = {"weight_map": {k: (shard_name(outside) if v == SHARDS[0] else v) for k, v in weight_map.items()}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("shard_name", [lambda outside: "../" + outside.name, lambda outside: str(outside)],
                         ids=["parent", "absolute"])
def test_an_index_cannot_name_a_shard_outside_the_directory(seed, rng, tmp_path, shard_name):
    directory = shard_moved_out(tmp_path, untied_causal_lm(seed), rng, shard_name)
    with pytest.raises(CheckpointError, match="is not a file name inside the model directory"):
        JetMoeForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_link_out_of_the_directory_is_refused(seed, tmp_path, name):
    model = untied_causal_lm(seed)
    directory, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    model.save_pretrained(directory)
    elsewhere.mkdir()
    os.replace(directory / name, elsewhere / name)
    os.symlink(elsewhere / name, directory / name)  # a valid file, but outside: only the path check refuses it
    with pytest.raises(ValueError, match="leads outside the model directory"):
        JetMoeForCausalLM.from_pretrained(directory)


def test_a_link_inside_the_directory_is_followed(seed, tmp_path):
    model = untied_causal_lm(seed)
    model.save_pretrained(tmp_path)
    os.replace(tmp_path / "model.safetensors", tmp_path / "weights.bin")
    os.symlink("weights.bin", tmp_path / "model.safetensors")
    assert_same_state(JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float64).state_dict(), model.state_dict())


@pytest.mark.parametrize("index, message", [("[]", "not a valid safetensors index"),
                                            ('{"weight_map": {"a": 3}}', "weight_map must map tensor names")])
def test_a_malformed_index_is_refused(seed, rng, tmp_path, index, message):
    model = untied_causal_lm(seed)
    write_sharded(tmp_path, model.config, model.state_dict(), rng)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message):
        JetMoeForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("entry", [dict(data_offsets=["a", "b"]), dict(data_offsets=[0.0, 8.0]),
                                   dict(shape=[2.0, 1.0]), dict(shape=[-2, -1])])
def test_a_header_entry_of_the_wrong_type_is_refused(tmp_path, entry):
    header = {"x": dict(dict(dtype="F32", shape=[2, 1], data_offsets=[0, 8]), **entry)}
    write_raw_safetensors(tmp_path / "model.safetensors", {"x": ("F32", np.ones((2, 1), np.float32))},
                          json.dumps(header).encode())
    with pytest.raises(SafetensorsError, match="malformed header entry"):
        read_safetensors(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("content, message", [("[1, 2]", "must hold a JSON object, got list"),
                                              ('{"rms_norm_eps": "x"}', "config.json: ")])
def test_a_config_of_the_wrong_shape_is_refused(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        JetMoeConfig.from_pretrained(tmp_path)




# ---------------------------------------------------------------- file dtypes

FILE_DTYPES = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32}


def widened(file_dtype, values):
    """A file dtype's values as float32 (exact: each format is a subset of float32), computed without ml_dtypes
    for BF16: a bfloat16 is the upper 16 bits of a float32."""
    if file_dtype == "BF16":
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def test_raw_writer_matches_safetensors(rng, tmp_path):
    # the hand-written format (used below for BF16 and corrupt files) is what the safetensors library reads
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16),
               "c": rng.standard_normal((2, 1, 4))}
    path = str(tmp_path / "t.safetensors")
    write_raw_safetensors(path, {"a": ("F32", tensors["a"]), "b": ("F16", tensors["b"]), "c": ("F64", tensors["c"])})
    assert_same_state(load_file(path), tensors)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("file_dtype", sorted(FILE_DTYPES))
def test_half_and_single_precision_files(seed, rng, tmp_path, file_dtype, dtype):
    model = untied_causal_lm(seed)
    stored = {n: t.astype(FILE_DTYPES[file_dtype]) for n, t in model.state_dict().items()}  # rounded
    model.config.save_pretrained(tmp_path / "file")
    write_raw_safetensors(tmp_path / "file" / "model.safetensors", {n: (file_dtype, t) for n, t in stored.items()})
    loaded = JetMoeForCausalLM.from_pretrained(tmp_path / "file", dtype=dtype)
    want = {n: widened(file_dtype, t).astype(dtype) for n, t in stored.items()}  # exact: widening is exact
    assert_same_state(loaded.state_dict(), want)
    if file_dtype != "F32" or dtype == np.float64:  # the file's rounding is visible: values are not the originals
        assert not np.array_equal(loaded.lm_head, model.lm_head.astype(dtype))
    # the same values from a float64 file give the same model: identical logits
    save_tensors(tmp_path / "f64", model.config, {n: t.astype(np.float64) for n, t in want.items()})
    reference_model = JetMoeForCausalLM.from_pretrained(tmp_path / "f64", dtype=dtype)
    ids = random_ids(rng)
    np.testing.assert_array_equal(loaded(ids).logits, reference_model(ids).logits)


# ---------------------------------------------------------------- memory mapping


def test_matching_dtype_is_memory_mapped(seed, tmp_path):
    model = untied_causal_lm(seed, dtype=np.float32)
    model.save_pretrained(tmp_path)
    file = os.path.abspath(tmp_path / "model.safetensors")
    loaded = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float32)
    for name, array in loaded.state_dict().items():
        assert array.dtype == np.float32, name
        assert not array.flags.owndata and not array.flags.writeable, name  # a read-only view, not a copy
        mapped = backing_memmap(array)
        assert mapped is not None and os.path.abspath(mapped.filename) == file, name
        np.testing.assert_array_equal(array, model.state_dict()[name], err_msg=name)


def test_other_dtype_is_converted(seed, tmp_path):
    model = untied_causal_lm(seed, dtype=np.float32)
    model.save_pretrained(tmp_path)
    loaded = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float64)
    for name, array in loaded.state_dict().items():
        assert array.dtype == np.float64, name
        assert array.flags.owndata and backing_memmap(array) is None, name  # a converted copy
        np.testing.assert_array_equal(array, model.state_dict()[name].astype(np.float64), err_msg=name)


# ---------------------------------------------------------------- errors: tensors


def test_missing_tensor(seed, rng, tmp_path):
    model = untied_causal_lm(seed)
    state = model.state_dict()
    victim = str(rng.choice(sorted(state)))
    del state[victim]
    save_tensors(tmp_path, model.config, state)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): " + re.escape(strip(victim)) + "$"):
        JetMoeForCausalLM.from_pretrained(tmp_path)


def test_missing_layer(seed, tmp_path):
    # a checkpoint of a 1-layer model for a 2-layer config: every tensor of layer 1 is named (8 shown, then ...)
    model = untied_causal_lm(seed)
    state = {n: t for n, t in model.state_dict().items() if ".layers.1." not in n}
    save_tensors(tmp_path, model.config, state)
    with pytest.raises(CheckpointError,
                       match=r"missing 11 tensor\(s\): layers\.1\.input_layernorm\.weight, .* \.\.\.$"):
        JetMoeForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor(seed, rng, tmp_path):
    model = untied_causal_lm(seed)
    extra = f"model.layers.{rng.integers(2)}.mlp.gate_proj.weight"
    save_tensors(tmp_path, model.config, {**model.state_dict(), extra: rng.standard_normal((3, D))})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): " + re.escape(strip(extra)) + "$"):
        JetMoeForCausalLM.from_pretrained(tmp_path)


def test_misshaped_tensor(seed, rng, tmp_path):
    model = untied_causal_lm(seed)
    state = model.state_dict()
    victim = str(rng.choice(sorted(state)))
    good = list(state[victim].shape)
    bad = list(good)
    bad[rng.integers(len(bad))] += int(rng.integers(1, 4))
    state[victim] = rng.standard_normal(bad)
    save_tensors(tmp_path, model.config, state)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {strip(victim)!r} has shape {bad} in the checkpoint, "
                                                        f"the config needs {good}")):
        JetMoeForCausalLM.from_pretrained(tmp_path)


def test_integer_tensor(seed, rng, tmp_path):
    model = untied_causal_lm(seed)
    state = model.state_dict()
    victim = str(rng.choice(sorted(state)))
    state[victim] = rng.integers(-5, 5, size=state[victim].shape).astype(np.int32)
    save_tensors(tmp_path, model.config, state)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {strip(victim)!r} has non-float dtype int32")):
        JetMoeForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- errors: files


@pytest.fixture
def saved(seed, tmp_path):
    """An untied CausalLM checkpoint in tmp_path; returns the path of its model.safetensors."""
    untied_causal_lm(seed).save_pretrained(tmp_path)
    return str(tmp_path / "model.safetensors")


def test_truncated_file(rng, tmp_path, saved):
    header, data_start = read_raw_header(saved)
    header.pop("__metadata__", None)
    last = max(header, key=lambda n: header[n]["data_offsets"][1])  # the tensor stored at the end of the file
    begin, end = header[last]["data_offsets"]
    size = os.path.getsize(saved)
    assert data_start + end == size
    cut = int(rng.integers(1, end - begin + 1))  # within the last tensor only
    os.truncate(saved, size - cut)
    with pytest.raises(CheckpointError, match=re.escape(f"truncated file: tensor {last!r} ends at byte {size} but "
                                                        f"the file has {size - cut} bytes")):
        JetMoeForCausalLM.from_pretrained(tmp_path)


def test_truncated_header(rng, tmp_path, saved):
    _, data_start = read_raw_header(saved)
    size = int(rng.integers(9, data_start))
    os.truncate(saved, size)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: corrupt or truncated safetensors file: header "
                                              rf"claims {data_start - 8} bytes but the file has {size}"):
        JetMoeForCausalLM.from_pretrained(tmp_path)
    os.truncate(saved, int(rng.integers(0, 8)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated safetensors file \(\d bytes, no header"):
        JetMoeForCausalLM.from_pretrained(tmp_path)


def test_corrupt_header(rng, tmp_path, saved):
    _, data_start = read_raw_header(saved)
    with open(saved, "r+b") as f:  # same length, garbage JSON
        f.seek(8)
        garbage = b"{not json " + bytes(rng.integers(ord("a"), ord("z") + 1, size=data_start - 18).astype(np.uint8))
        f.write(garbage)
    with pytest.raises(CheckpointError, match=r"model.safetensors header is not valid JSON: Expecting"):
        JetMoeForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("header,message", [
    (b"[1, 2, 3]", r"corrupt safetensors header \(not a JSON object\)"),
    (b"\xff\xfe{}", r"corrupt safetensors header"),
    (b'{"model.norm.weight": {"dtype": "F64"}}', r"tensor 'model.norm.weight' has a malformed header entry"),
    (b'{"model.norm.weight": {"dtype": "F8_E4M3", "shape": [24], "data_offsets": [0, 24]}}',
     r"tensor 'model.norm.weight' has unsupported dtype F8_E4M3"),
    (b'{"model.norm.weight": {"dtype": "F64", "shape": [24], "data_offsets": [0, 100]}}',
     r"tensor 'model.norm.weight' is corrupt: shape \[24\] F64 needs 192 bytes, header gives offsets \[0, 100\)"),
], ids=["not_object", "not_utf8", "malformed_entry", "unsupported_dtype", "bad_offsets"])
def test_invalid_header(rng, tmp_path, header, message):
    small_config().save_pretrained(tmp_path)
    write_raw_safetensors(tmp_path / "model.safetensors", {"model.norm.weight": ("F64", rng.standard_normal(D))},
                          header=header)
    with pytest.raises(CheckpointError, match=message):
        JetMoeForCausalLM.from_pretrained(tmp_path)


def test_missing_directory(tmp_path):
    path = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=re.escape(repr(path)) + " does not exist"):
        JetMoeForCausalLM.from_pretrained(path)


def test_missing_model_file(tmp_path):
    small_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has neither model.safetensors nor model.safetensors.index.json"):
        JetMoeForCausalLM.from_pretrained(str(tmp_path))


def test_missing_config(saved, tmp_path):
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no config.json at .*config.json"):
        JetMoeForCausalLM.from_pretrained(str(tmp_path))


def test_missing_shard(seed, rng, tmp_path):
    model = untied_causal_lm(seed)
    write_sharded(tmp_path, model.config, model.state_dict(), rng)
    gone = SHARDS[int(rng.integers(2))]
    os.remove(tmp_path / gone)
    with pytest.raises(CheckpointError, match=re.escape(f"lists shard {gone!r}, which is missing")):
        JetMoeForCausalLM.from_pretrained(tmp_path)


def test_index_names_the_wrong_shard(seed, rng, tmp_path):
    model = untied_causal_lm(seed)
    weight_map = write_sharded(tmp_path, model.config, model.state_dict(), rng)
    moved = str(rng.choice(sorted(weight_map)))
    other = SHARDS[1 - SHARDS.index(weight_map[moved])]
    weight_map[moved] = other
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(CheckpointError, match=re.escape(f"puts tensor {moved!r} in {other!r}, which does not "
                                                        "contain it")):
        JetMoeForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, message", [("{not json", r"index.json is not valid JSON: Expecting"),
                                           ('{"metadata": {}}', r"index.json: not a valid safetensors index")],
                         ids=["garbage", "no_weight_map"])
def test_corrupt_index(tmp_path, text, message):
    small_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        JetMoeForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- config.json


def test_config_json_round_trip(seed, rng, tmp_path):
    theta = float(rng.uniform(1e3, 1e6))
    values = small_config(rope_theta=theta, rms_norm_eps=float(rng.uniform(1e-7, 1e-5))).to_dict()
    values.update({"torch_dtype": "float64", "transformers_version": "4.56.2",
                   "unknown_key": {"nested": rng.integers(0, 100, size=3).tolist(), "flag": True}})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps(values))
    config = JetMoeConfig.from_pretrained(str(tmp_path / "a"))
    assert config.rope_theta == theta and config.extra["unknown_key"] == values["unknown_key"]
    config.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == values
    # through a model too: its save_pretrained writes the same config.json, and the loaded model uses rope_theta
    model = JetMoeForCausalLM.from_random(config, seed=seed, dtype=np.float64)
    model.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text()) == values
    loaded = JetMoeForCausalLM.from_pretrained(tmp_path / "c", dtype=np.float64)
    ids = random_ids(rng)
    np.testing.assert_array_equal(loaded(ids).logits, model(ids).logits)
    default_theta = JetMoeForCausalLM.from_random(small_config(rms_norm_eps=config.rms_norm_eps), seed=seed,
                                                  dtype=np.float64)
    assert not np.allclose(default_theta(ids).logits, loaded(ids).logits, rtol=1e-6, atol=0)  # theta matters


# ---------------------------------------------------------------- transformers loads our checkpoint

# HF computes RMSNorm, RoPE angles (a float32 inv_freq), router logits and the attention softmax in float32 even
# in a float64 model, so it carries ~1e-7 relative error per step; 1e-6 (normwise) leaves room for a few steps
# of growth and is far below any real bug (a wrong weight or layout changes logits by O(1)).
ORACLE_RTOL = 1e-6
# HF's float32 router logits may differ from ours by ~1e-6; inputs whose k-th and (k+1)-th router logits are
# closer than this could route to other experts in HF, so they are redrawn.
MIN_ROUTER_MARGIN = 1e-4


def clear_routing_ids(model, rng):
    k = model.config.num_experts_per_tok
    for _ in range(100):
        ids = rng.integers(0, V, size=(2, 9))
        logits = model(ids, output_router_logits=True).router_logits
        margin = min(float(np.min(-np.diff(np.sort(r, axis=-1)[:, ::-1], axis=-1)[:, k - 1])) for r in logits)
        if margin > MIN_ROUTER_MARGIN:
            return ids
    raise AssertionError("no input with clear top-k routing margins in 100 draws")


@pytest.mark.oracle
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformers_loads_reference_checkpoint(seed, rng, tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = JetMoeForCausalLM.from_random(small_config(tie_word_embeddings=tie), seed=seed, dtype=np.float64)
    model.save_pretrained(tmp_path)
    hf, info = transformers.JetMoeForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64,
                                                              attn_implementation="eager", output_loading_info=True)
    # lists in 4.56.2, sets in 5.x: empty either way
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie
    ids = clear_routing_ids(model, rng)
    with torch.no_grad():
        want = hf.eval()(torch.from_numpy(ids)).logits.numpy()
    got = model(ids).logits
    assert want.dtype == np.float64 and got.shape == want.shape
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel < ORACLE_RTOL, f"normwise relative error {rel:.3e} >= {ORACLE_RTOL:g}"

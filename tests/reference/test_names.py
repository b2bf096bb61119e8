"""The one table of tensor names (reference/names.py): it covers a real checkpoint, and the four views derived from
it (model.py's BlockWeights and block_weights, io/checkpoint.py's shapes, counting.py's parts, gpu/model.py's
FLOAT32_ALWAYS) agree with it, so a tensor added in one place only fails here."""

import dataclasses

import numpy as np
import pytest

from gpu.model import FLOAT32_ALWAYS
from reference import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification
from reference.counting import part_of
from reference.io import checkpoint
from reference.io.checkpoint import all_parameter_shapes, base_parameter_shapes, read_checkpoint_tensors
from reference.model import BlockWeights, ExpertWeights, block_from_leaves, block_leaves, block_weights
from reference.names import BASE_TENSORS, BLOCK_TENSORS, HEAD_TENSORS, tensor_of
from tests.paths import TINY_MODEL

# Every size distinct, so a shape with two symbols swapped (E for H, F for Dh, ...) cannot pass by coincidence.
CONFIG = JetMoeConfig(vocab_size=53, hidden_size=24, num_hidden_layers=2, num_key_value_heads=2, kv_channels=6,
                      intermediate_size=10, num_local_experts=5, num_experts_per_tok=3, num_labels=3,
                      tie_word_embeddings=False)


def table_names(config, head):
    # -> every HF name (without "model.") the table gives a `head` model, in the table's order
    return ([t.name() for t in BASE_TENSORS]
            + [t.name(i) for i in range(config.num_hidden_layers) for t in BLOCK_TENSORS]
            + [t.name() for t in HEAD_TENSORS[head]])


def placed(model, name):
    # the tensor `model` holds where the table says `name` lives
    t = tensor_of(name)
    if t in BLOCK_TENSORS:
        owner = model.model.layers[int(name.split(".")[1])]  # layers.{i}.<suffix>
    else:
        owner = model.model if t in BASE_TENSORS else model
    for attribute in t.place:
        owner = getattr(owner, attribute)
    return owner


def test_the_table_covers_every_tensor_of_a_real_checkpoint():
    config = JetMoeConfig.from_pretrained(TINY_MODEL)
    tensors = read_checkpoint_tensors(TINY_MODEL)
    stored = [n for n in table_names(config, "causal_lm") if n != "lm_head.weight" or not config.tie_word_embeddings]
    assert sorted(n.removeprefix("model.") for n in tensors) == sorted(stored)
    for name, tensor in tensors.items():
        assert tensor_of(name).dims(config) == tensor.shape, name


@pytest.mark.parametrize("head", ["base", "causal_lm", "sequence_classification"])
def test_checkpoint_shapes_are_the_tables(head):
    expected = {n: tensor_of(n).dims(CONFIG) for n in table_names(CONFIG, head)}
    assert list(all_parameter_shapes(CONFIG, head).items()) == list(expected.items())  # order too: from_random
    assert base_parameter_shapes(CONFIG) == {n: s for n, s in expected.items() if tensor_of(n) not in
                                             HEAD_TENSORS[head]}
    assert checkpoint.HEAD_TENSORS[head] == tuple(t.name() for t in HEAD_TENSORS[head])


def test_block_weights_hold_every_tensor_where_the_table_says():
    fields = [(f.name,) for f in dataclasses.fields(BlockWeights) if f.type is not ExpertWeights]
    fields += [(part, f.name) for part in ("attention", "mlp") for f in dataclasses.fields(ExpertWeights)
               if (part, f.name) != ("mlp", "kv_proj")]  # the MoE has no kv_proj
    assert sorted(t.place for t in BLOCK_TENSORS) == sorted(fields)
    names = [t.name(1) for t in BLOCK_TENSORS]
    assert block_leaves(block_from_leaves(names)) == names
    tensors = {n: np.zeros(s) for n, s in base_parameter_shapes(CONFIG).items()}
    assert all(a is tensors[n] for a, n in zip(block_leaves(block_weights(tensors, 1)), names))
    for cls in (JetMoeForCausalLM, JetMoeForSequenceClassification):
        model = cls.from_random(CONFIG)
        state = model.state_dict()
        assert sorted(n.removeprefix("model.") for n in state) == sorted(table_names(CONFIG, cls.head))
        for name, tensor in state.items():
            assert placed(model, name.removeprefix("model.")) is tensor, name


def test_counting_parts_are_the_tables():
    for name in table_names(CONFIG, "causal_lm"):
        assert part_of("model." + name) == tensor_of(name).part
    with pytest.raises(ValueError, match="score.weight"):
        part_of("score.weight")  # the classification head is no part of a causal LM


def test_gpu_float32_tensors_are_the_tables():
    names = table_names(CONFIG, "causal_lm") + table_names(CONFIG, "sequence_classification")
    for name in names + ["model." + n for n in names]:
        assert name.endswith(FLOAT32_ALWAYS) == tensor_of(name).float32, name
    assert {t.suffix for t in (*BASE_TENSORS, *BLOCK_TENSORS) if t.float32} == {
        "norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight", "self_attention.experts.bias",
        "mlp.bias", "self_attention.experts.router.layer.weight", "mlp.router.layer.weight"}


@pytest.mark.parametrize("name", ["layers.0.mlp.gate.weight", "layers.0.norm.weight", "lm_head.bias",
                                  "model.layers.x.mlp.bias", "mlp.bias"])
def test_a_name_outside_the_table_is_refused(name):
    with pytest.raises(ValueError, match="is not one of JetMoE's"):
        tensor_of(name)

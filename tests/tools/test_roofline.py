"""`jetmoe generate --stats` (jetmoe/roofline.py): the bytes of distinct weights a decoded token reads, from the
config's shapes, and the copy bandwidth measured once and cached."""

import json

import numpy as np
import pytest

from jetmoe import roofline
from jetmoe.command import main
from reference import JetMoeForCausalLM

from paths import TINY_MODEL as MODEL


@pytest.fixture(scope="module")
def tiny():
    return JetMoeForCausalLM.from_pretrained(MODEL)  # float32: 4 bytes a weight


def routing_choosing(config, experts, tokens):
    # every token of every router chooses `experts` -> {router name: [N, K]}
    return {f"layers.{i}.{part}.router.top_k_indices": np.tile(experts, (tokens, 1))
            for i in range(config.num_hidden_layers) for part in ("attention", "mlp")}


@pytest.mark.parametrize("experts", [[0, 1], [3, 3], [7, 2]])
def test_bytes_read_counts_each_distinct_expert_once(tiny, experts):
    c = tiny.config
    moa = 2 * c.num_key_value_heads * c.kv_channels * c.hidden_size  # query and output maps of one MoA expert
    moe = 3 * c.intermediate_size * c.hidden_size  # the SwiGLU's two input maps and the output map of one MoE expert
    every_weight = sum(t.nbytes for t in tiny.state_dict().values())
    routed, rest = roofline.bytes_read(tiny, routing_choosing(c, experts, tokens=5), np.array([[4, 5, 6, 7, 8]]))
    distinct = len(set(experts))
    assert routed == 4 * c.num_hidden_layers * distinct * (moa + moe)
    assert rest == every_weight - 4 * c.num_hidden_layers * c.num_local_experts * (moa + moe)  # tied: the lm_head


def test_generate_stats_prints_one_row_per_token(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(roofline, "CACHE", str(tmp_path / "build" / "copy_bandwidth.json"))
    assert main(["generate", "--model", MODEL, "--prompt", "ROMEO:", "--max-new-tokens", "4", "--temperature", "0",
                 "--stats"]) == 0
    err = capsys.readouterr().err
    table = err[err.index("token  routed MiB"):].splitlines()[1:]
    assert [int(line.split()[0]) for line in table] == [0, 1, 2, 3] and "(prefill)" in table[0]
    assert all(float(line.split()[1]) == 6.0 for line in table[1:])  # batch 1: K=2 of E=8 experts a layer, 6 MiB
    assert json.loads((tmp_path / "build" / "copy_bandwidth.json").read_text())["bytes_per_second"] > 0


def test_the_copy_bandwidth_is_measured_once_per_machine(tmp_path, monkeypatch):
    cache = str(tmp_path / "copy_bandwidth.json")
    calls = []
    monkeypatch.setattr(roofline, "measure_copy_bandwidth", lambda: calls.append(1) or 2.5e10)
    assert roofline.copy_bandwidth(cache) == (2.5e10, True)
    assert roofline.copy_bandwidth(cache) == (2.5e10, False) and len(calls) == 1
    monkeypatch.setattr(roofline, "machine", lambda: "another machine")
    assert roofline.copy_bandwidth(cache) == (2.5e10, True) and len(calls) == 2


def test_measured_copy_bandwidth_is_a_rate():
    rate = roofline.measure_copy_bandwidth(nbytes=8 << 20, repeats=2)  # bytes/s; its size is the machine's
    assert np.isfinite(rate) and rate > 0

"""Memory, measured: a 1-layer cut of the jetmoe-8b layout (scripts/make_8b_shaped.py, 0.8 GB of bf16) run with
its matrices left in the file keeps its own memory (peak RssAnon, sampled; mapped file pages are page cache, not
ours) below what one token's active weights take in float32, and gives the same bits as the model converted at load.
Each run is a fresh subprocess, so one run's memory cannot hide in the other's.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from paths import ROOT
from reference import JetMoeConfig
from reference.counting import active_parameters

CUT = os.path.join(ROOT, "build", "test-cache", "jetmoe-8b-shaped-1-layer")
CHILD = r"""
import json, sys
import numpy as np
from jetmoe.cli import PeakMemory, status_bytes
from reference import JetMoeForCausalLM
path, max_memory, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
before = status_bytes("RssAnon")
with PeakMemory() as peak:
    model = JetMoeForCausalLM.from_pretrained(path, max_memory=max_memory)
    ids = np.random.default_rng(int(sys.argv[4])).integers(0, model.config.vocab_size, size=(1, 20))
    logits = model(input_ids=ids).logits  # a 20-token prefill: whole-matrix products
    tokens = model.generate(ids[:, :6], max_new_tokens=4)  # decode steps: block by block
np.savez(out, logits=logits, tokens=tokens)
print(json.dumps({"own_bytes": peak.anon - before, "mapped": type(model.lm_head).__name__ == "MappedWeight"}))
"""


@pytest.fixture(scope="module")
def cut():
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_8b_shaped.py"), "--layers", "1", "--out",
                    CUT], check=True, capture_output=True, timeout=600)
    return CUT


def run_child(path, max_memory, out, seed):
    done = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps(max_memory), str(out), str(seed)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), np.load(out)


def test_mapped_weights_stay_within_the_active_bytes(cut, tmp_path, seed):
    config = JetMoeConfig.from_pretrained(cut)
    bound = 4 * sum(active_parameters(config).values())  # one token's weights in float32: 0.64 GB for this cut;
    # converting all of the cut takes 1.67 GB
    mapped, mapped_out = run_child(cut, 64 << 20, tmp_path / "mapped.npz", seed)
    converted, converted_out = run_child(cut, None, tmp_path / "converted.npz", seed)
    assert mapped["mapped"] and not converted["mapped"]
    print(f"peak own memory: mapped {mapped['own_bytes'] / 2**20:.0f} MiB, converted "
          f"{converted['own_bytes'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert mapped["own_bytes"] < bound
    assert converted["own_bytes"] > bound  # control: the measurement sees a model converted at load
    # the same products summed in another order (blocks against one product): float32 rounding, normwise
    scale = np.max(np.abs(converted_out["logits"]))
    assert np.max(np.abs(mapped_out["logits"] - converted_out["logits"])) <= 1e-5 * scale
    np.testing.assert_array_equal(mapped_out["tokens"], converted_out["tokens"])


DEBUG_CHILD = r"""
import json, sys
import numpy as np
from jetmoe.cli import PeakMemory, status_bytes
from jetmoe.debug import Side, forwards_of, isolated_trace
from reference import JetMoeForCausalLM
from reference.generation import generate
from reference.io.trace import handling
from reference.io.trace_files import TraceWriter, load_with_metadata
path, out = sys.argv[1], sys.argv[2]
model = JetMoeForCausalLM.from_pretrained(path, max_memory=64 << 20)  # mapped, as the full 8B is
ids = np.random.default_rng(int(sys.argv[3])).integers(0, model.config.vocab_size, size=(1, 12))
before = status_bytes("RssAnon")
with PeakMemory() as peak:
    with TraceWriter(out) as writer, handling(writer):  # `jetmoe debug dump --max-new-tokens 4`
        generate(model, ids, max_new_tokens=4)
    saved = load_with_metadata(out)[0]
    isolated = isolated_trace(model, forwards_of(Side(out, "file", "float32", saved), []), saved)  # --isolate
worst = max(float(np.max(np.abs(isolated[n].astype(np.float64) - saved[n]))) for n in saved)
print(json.dumps({"own_bytes": peak.anon - before, "tensors": len(saved), "worst": worst,
                  "trace_bytes": sum(v.nbytes for v in saved.values())}))
"""


def test_debug_dump_and_isolate_stay_within_the_active_bytes(cut, tmp_path, seed):
    """`jetmoe debug` on the mapped 8B layout: a dump with decode steps, written as the forward goes, then an
    isolated comparison of that file, stay below one token's active weights in float32; the isolated reference
    reproduces its own dump exactly."""
    config = JetMoeConfig.from_pretrained(cut)
    bound = 4 * sum(active_parameters(config).values())
    done = subprocess.run([sys.executable, "-c", DEBUG_CHILD, cut, str(tmp_path / "trace.safetensors"), str(seed)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"debug peak own memory {result['own_bytes'] / 2**20:.0f} MiB for {result['tensors']} tensors "
          f"({result['trace_bytes'] / 2**20:.0f} MiB), bound {bound / 2**20:.0f} MiB")
    assert result["tensors"] == 4 * (3 + 21 + 3) and result["worst"] == 0.0  # 4 forwards: inputs, layer, ends
    assert result["own_bytes"] < bound

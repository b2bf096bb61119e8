"""`--device gpu`: the commands run the GPU twin (gpu/), here on the CPU emulator when no CUDA device is present
(tests/conftest.py sets JETMOE_GPU=emulate then), and agree with the NumPy reference."""

import os
import subprocess
import sys

from paths import ROOT, TINY_MODEL


def jetmoe(*args):
    done = subprocess.run([sys.executable, "-m", "jetmoe", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_generate_on_the_gpu_twin_gives_the_reference_greedy_text():
    args = ("generate", "--model", TINY_MODEL, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0",
            "--no-stats")
    gpu_text = jetmoe(*args, "--device", "gpu")
    assert gpu_text == jetmoe(*args), "the GPU twin's greedy text differs from the reference's"
    assert len(gpu_text.strip()) > len("ROMEO:")


def test_debug_compare_ref_gpu_finds_no_divergence():
    out = jetmoe("debug", "compare", TINY_MODEL, "ref", "gpu", "--prompt", "ROMEO:", "--max-new-tokens", "2")
    assert "no divergence" in out, out[-2000:]


def test_evaluate_on_the_gpu_twin_matches_the_reference(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nWhat light through yonder window breaks?\n")
    args = ("evaluate", "--model", TINY_MODEL, "--text-file", str(text))
    gpu_lines, ref_lines = jetmoe(*args, "--device", "gpu").splitlines(), jetmoe(*args).splitlines()
    assert gpu_lines[0] == ref_lines[0]  # tokens predicted
    gpu_loss, ref_loss = float(gpu_lines[1].split()[1]), float(ref_lines[1].split()[1])
    assert abs(gpu_loss - ref_loss) <= 1e-3, (gpu_loss, ref_loss)  # 4 printed decimals, float32 sums

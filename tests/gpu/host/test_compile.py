"""Every gpu/kernels/*.cu compiles, with no GPU needed: nvcc for sm_80 and sm_90 with warnings as errors, and, where
libnvrtc can be found, NVRTC with the options CuPy's RawModule uses at run time.

Each nvcc run prints ptxas' resource report (registers, spills, stack, shared memory per kernel) to stdout, so it
shows in the CI log with `pytest -s`, and the module writes all of them to build/kernel_resources.txt.
The op list is gpu.kernels.ops(), so a .cu file added later is covered without touching this file.
"""

import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from gpu.kernels import KERNEL_DIR, NVRTC_OPTIONS, ops

from paths import ROOT

ARCHS = ("sm_80", "sm_90")
REPORT_PATH = os.path.join(ROOT, "build", "kernel_resources.txt")
# Ops whose owners checked that no kernel spills registers (a spill is a silent slowdown, never a compile error);
# an op's owner adds it here once that holds for their kernels.
NO_SPILL_OPS = ("attention", "expert_gemm", "linear", "rms_norm", "rope", "routing")
CUPY_EXTRA_OPTIONS = ("-ftz=true",)  # cupy.cuda.compiler appends it to every RawModule's options


def find_nvcc():
    """nvcc on PATH, else the default CUDA install; None when neither exists."""
    default = "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc") or (default if os.access(default, os.X_OK) else None)


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (neither on PATH nor at "
                                "/usr/local/cuda/bin/nvcc): install the CUDA toolkit to compile-check the kernels")


def nvcc_command(op, arch, cubin):
    # Paths relative to the repo root, so the printed command can be pasted as is.
    return [NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-I", "gpu/kernels", "-Werror", "all-warnings",
            "-Xptxas", "-v", "-o", str(cubin), f"gpu/kernels/{op}.cu"]


def parse_ptxas(log):
    """ptxas -v output -> {kernel: {registers, stack, spill_stores, spill_loads, smem}} (bytes, except registers)."""
    kernels, current = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = kernels.setdefault(m.group(1), {"registers": 0, "stack": 0, "spill_stores": 0,
                                                      "spill_loads": 0, "smem": 0})
        elif m := re.search(r"Function properties for (\S+)", line):
            current = kernels.get(m.group(1), current)
        elif current is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                     r"(\d+) bytes spill loads", line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return kernels


def format_report(op, arch, kernels):
    lines = [f"{op}.cu  {arch}"]
    lines += [f"  {name:<36} {k['registers']:>4} regs  {k['spill_stores']:>4} B spill st  {k['spill_loads']:>4} B "
              f"spill ld  {k['stack']:>5} B stack  {k['smem']:>6} B smem" for name, k in sorted(kernels.items())]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def resource_reports():
    """Collects each (op, arch) report; written to build/kernel_resources.txt when the module ends."""
    reports = {}
    yield reports
    if reports:
        os.makedirs(os.path.dirname(REPORT_PATH), exist_ok=True)
        with open(REPORT_PATH, "w") as f:
            f.write(f"# ptxas -v resource usage per kernel ({os.path.basename(NVCC or 'nvcc')}, "
                    "tests/gpu/host/test_compile.py)\n\n")
            f.write("\n\n".join(reports[key] for key in sorted(reports)) + "\n")


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", ops())
def test_nvcc_compiles_without_warnings(op, arch, tmp_path, resource_reports):
    command = nvcc_command(op, arch, tmp_path / f"{op}_{arch}.cubin")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)}\nfailed with exit code {result.returncode}:\n{log}"
    kernels = parse_ptxas(log)
    report = format_report(op, arch, kernels)
    resource_reports[(op, arch)] = report
    print(f"\n{report}")
    assert kernels, f"no ptxas resource report for {op}.cu ({arch}); is -Xptxas -v honoured?\n{log}"
    if op in NO_SPILL_OPS:
        spilling = {name: k for name, k in kernels.items() if k["spill_stores"] or k["spill_loads"]}
        assert not spilling, f"{op}.cu ({arch}) spills registers: {spilling}"


# ------------------------------------------------------------------------------------------------ NVRTC

def find_nvrtc():
    """libnvrtc via $JETMOE_NVRTC, the loader's path, the nvidia-cuda-nvrtc wheel (CUDA 13: nvidia/cu13/lib, the
    test extra's; CUDA 12: nvidia/cuda_nvrtc/lib), or the CUDA install; or None."""
    candidates = [os.environ.get("JETMOE_NVRTC"), ctypes.util.find_library("nvrtc")]
    for base in sys.path:
        for wheel_dir in (("nvidia", "cu13", "lib"), ("nvidia", "cuda_nvrtc", "lib")):
            candidates += sorted(glob.glob(os.path.join(base, *wheel_dir, "libnvrtc.so*")))
    candidates += sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"))
    for path in filter(None, candidates):
        try:
            # libnvrtc dlopens libnvrtc-builtins by name at compile time; a wheel's directory is not on the loader's
            # path, so load the builtins beside it first, globally
            for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def nvrtc_compile(lib, op, arch):
    """-> (status, log) of compiling gpu/kernels/<op>.cu as gpu.kernels.module() does (0 is success)."""
    with open(os.path.join(KERNEL_DIR, f"{op}.cu"), "rb") as f:
        source = f.read()
    program = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(program), source, f"{op}.cu".encode(), 0, None, None)
    assert status == 0, f"nvrtcCreateProgram failed with status {status}"
    options = [o.encode() for o in NVRTC_OPTIONS + CUPY_EXTRA_OPTIONS + (f"-arch={arch}",)]
    status = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return status, log.value.decode(errors="replace")


NVRTC = find_nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (set JETMOE_NVRTC, or pip install -e "
                    "'.[test]', which brings nvidia-cuda-nvrtc 13): NVRTC, unlike nvcc, pre-includes no CUDA header")
@pytest.mark.parametrize("arch", ("compute_80", "compute_90"))
@pytest.mark.parametrize("op", ops())
def test_nvrtc_compiles(op, arch):
    status, log = nvrtc_compile(NVRTC, op, arch)
    assert status == 0, f"NVRTC ({arch}) failed on {op}.cu with status {status}:\n{log}"

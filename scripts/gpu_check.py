"""`make gpu-check`: on a CUDA machine, run the whole GPU parity suite and the GPU benchmark, and write a markdown
report (device, versions, parity table, speed table) to build/gpu_report.md (and to $OUT when set).

The parity suite runs twice: on the GPU (JETMOE_GPU=cuda) and on the CPU emulator (JETMOE_GPU=emulate, cudasim,
with its own tests in tests/cudasim), and the table gives both outcomes side by side.

Runs with whatever python3 the machine has; installs only what is missing (CuPy, pytest, hypothesis) and says so.
"""

import datetime
import importlib
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
NEEDED = {"cupy": "cupy-cuda13x", "pytest": "pytest", "hypothesis": "hypothesis", "numpy": "numpy",
          "safetensors": "safetensors", "ml_dtypes": "ml_dtypes"}


def ensure_packages():
    for module, package in NEEDED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            print(f"gpu-check: {module} is missing, installing {package}")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)


def versions():
    import cupy
    out = {"python": platform.python_version(), "cupy": cupy.__version__,
           "CUDA runtime": cupy.cuda.runtime.runtimeGetVersion(), "CUDA driver": cupy.cuda.runtime.driverGetVersion()}
    for name in ("numpy", "torch", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "not installed"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    memory = props['totalGlobalMem'] / 2**30
    out["device"] = f"{props['name'].decode()} (sm_{props['major']}{props['minor']}, {memory:.0f} GiB)"
    return out


def run_parity(junit_path, backend):
    # tests/gpu: the host logic and compile checks (tests/gpu/host) and the requires_gpu parity tests
    # (tests/gpu/device);
    # on the emulator also cudasim's own tests
    folders = [os.path.join("tests", "gpu")] + ([os.path.join("tests", "cudasim")] if backend == "emulate" else [])
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", f"--junitxml={junit_path}", *folders]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JETMOE_GPU": backend})
    return proc.returncode, proc.stdout + proc.stderr


def parity_rows(junit_path):
    rows = []
    for case in ElementTree.parse(junit_path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
        rows.append((f"{case.get('classname')}::{case.get('name')}", outcome, float(case.get("time", 0)), detail))
    return rows


def run_bench(json_path):
    cmd = [sys.executable, os.path.join("scripts", "bench_gpu.py"), "--json", json_path]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def main():
    ensure_packages()
    os.makedirs(BUILD, exist_ok=True)
    lines = [f"# GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    lines += [f"- {k}: {v}" for k, v in versions().items()] + [""]
    results, logs, code = {}, [], 0
    for backend in ("cuda", "emulate"):
        junit = os.path.join(BUILD, f"gpu_junit_{backend}.xml")
        backend_code, log = run_parity(junit, backend)
        code |= backend_code
        logs.append(f"==== JETMOE_GPU={backend} ====\n{log}")
        rows = parity_rows(junit) if os.path.exists(junit) else []
        results[backend] = {name: (outcome, t, detail) for name, outcome, t, detail in rows}
        counts = {k: sum(r[1] in k for r in rows) for k in (("passed",), ("FAILED", "ERROR"), ("skipped",))}
        lines.append(f"- {'GPU' if backend == 'cuda' else 'CPU emulator (cudasim)'}: {counts[('passed',)]} passed, "
                     f"{counts[('FAILED', 'ERROR')]} failed, {counts[('skipped',)]} skipped; pytest exit "
                     f"{backend_code}")
    log = "\n".join(logs)
    lines += ["", "## Parity, GPU beside the emulator", "",
              "| test | GPU | s | emulator | s | detail |", "|---|---|---|---|---|---|"]
    none = ("not run", 0.0, "")
    for name in sorted(set(results["cuda"]) | set(results["emulate"])):
        (g, gt, gd), (e, et, ed) = results["cuda"].get(name, none), results["emulate"].get(name, none)
        detail = (gd or ed).replace("|", "/")
        lines.append(f"| {name} | {g} | {gt:.2f} | {e} | {et:.2f} | {detail} |")
    bench_code, bench_log = run_bench(os.path.join(BUILD, "gpu_bench.json"))
    lines += ["", f"## Speed (scripts/bench_gpu.py, exit {bench_code})", "", bench_log.strip()[-6000:]]
    report = "\n".join(lines) + "\n"
    for folder in filter(None, [BUILD, os.environ.get("OUT")]):
        with open(os.path.join(folder, "gpu_report.md"), "w") as f:
            f.write(report)
        with open(os.path.join(folder, "gpu_pytest.log"), "w") as f:
            f.write(log)
    print(report)
    sys.exit(1 if (code != 0 or bench_code != 0) else 0)


if __name__ == "__main__":
    main()

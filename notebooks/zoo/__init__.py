"""The bug zoo of notebook 09, "Find the bug": small ports of JetMoE, each with one bug of the kind real JetMoE
ports have. A port here is the reference with one function swapped for the mistake, as tests/ports.py does it;
its trace is written as a port in another language would write it, under the reference's names.

    python -m notebooks.zoo pads --out port.safetensors       # write the port's trace; prints the debugger call
    jetmoe debug compare weights/jetmoe-tiny-shakespeare port.safetensors --isolate

Each exercise module holds SYMPTOM (what a user of the port sees), DUMP (the flags `jetmoe debug dump` runs the
port with), COMPARE (the flags of the debugger call), patches(model) -> [(module, attribute, value)], optionally
checkpoint(model_dir, out_dir) -> the directory of the checkpoint the exercise runs on, and the hidden answer:
ANSWER (the bug, in words) and PLANTED (the trace names the debugger must name: the first is its first
divergence). tests/tools/test_zoo.py asserts that the debugger names them in every exercise.
"""

import contextlib
import importlib
import os

import numpy as np

EXERCISES = ("pads", "rope_theta", "gates_bf16", "ties", "decode_position", "loss_shift", "aux_pooled",
             "router_detached")
PROMPTS = ("ROMEO:", "What light through yonder window breaks?")  # two lengths: the first row is left-padded
MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "weights",
                     "jetmoe-tiny-shakespeare")


def exercise(name):
    """The module of exercise `name` (one of EXERCISES)."""
    if name not in EXERCISES:
        raise ValueError(f"no exercise {name!r}: one of {', '.join(EXERCISES)}")
    return importlib.import_module(f"{__name__}.{name}")


@contextlib.contextmanager
def patched(patches):
    """Apply (module, attribute, value) patches for the block, then restore the originals."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def model_dir_of(name, out_dir, model_dir=MODEL):
    """The checkpoint exercise `name` runs on: the bundled one, or the variant its checkpoint() writes."""
    module = exercise(name)
    if not hasattr(module, "checkpoint"):
        return model_dir
    return module.checkpoint(model_dir, os.path.join(out_dir, f"{name}-checkpoint"))


def copy_checkpoint(model_dir, out_dir, config=None, tensors=None):
    """A copy of a checkpoint into out_dir with config.json keys and safetensors tensors replaced; returns out_dir."""
    import json
    import shutil
    from reference.io.safetensors import read_safetensors, write_safetensors
    os.makedirs(out_dir, exist_ok=True)
    for file in ("tokenizer.json", "generation_config.json"):
        shutil.copyfile(os.path.join(model_dir, file), os.path.join(out_dir, file))
    with open(os.path.join(model_dir, "config.json")) as f:
        values = {**json.load(f), **(config or {})}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(values, f, indent=2)
    weights = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    for key, change in (tensors or {}).items():
        weights[key] = change(weights[key])
    write_safetensors(os.path.join(out_dir, "model.safetensors"), weights, metadata={"format": "pt"})
    return out_dir


def dump(name, out, model_dir=MODEL, dtype="float32"):
    """Write the trace of exercise `name`'s port to `out`; returns (model directory, the debugger's argv after
    `jetmoe debug compare`)."""
    import jetmoe.cli
    import jetmoe.command
    from reference import JetMoeForCausalLM
    module = exercise(name)
    model_dir = model_dir_of(name, os.path.dirname(os.path.abspath(out)), model_dir)
    model = JetMoeForCausalLM.from_pretrained(model_dir, dtype=np.dtype(dtype))

    class Loaded:  # the dump runs the very model the port's weight-keyed patches know
        from_pretrained = staticmethod(lambda *args, **kwargs: model)

    argv = ["debug", "dump", model_dir, "--out", str(out), "--dtype", dtype, *module.DUMP]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    with patched([*module.patches(model), (jetmoe.cli, "JetMoeForCausalLM", Loaded)]):
        if jetmoe.command.main(argv) != 0:
            raise RuntimeError(f"the dump of exercise {name} failed")
    return model_dir, [model_dir, str(out), *module.COMPARE]


def answer(name):
    """The hidden answer of exercise `name`: what the bug is and the tensors the debugger names."""
    module = exercise(name)
    return f"{module.ANSWER}\nThe debugger names: {', '.join(module.PLANTED)}"

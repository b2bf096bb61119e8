"""What the tools of the `jetmoe` command share (the command itself: jetmoe/command.py): loading a model directory
with its tokenizer, argument checks, peak memory, and USER_ERRORS, the exceptions that become one `error:` line
on stderr and a non-zero exit instead of a traceback.
"""

import argparse
import math
import os
import threading

import numpy as np
from tqdm import tqdm

from reference import CheckpointError, JetMoeConfig, JetMoeForCausalLM
from reference.io import files
from reference.io.tokenizer import Tokenizer, TokenizerError

from .device import DEVICES, load_gpu

# What a user can get wrong: a path or file (FileNotFoundError, CheckpointError, TokenizerError), text that is not
# UTF-8 (UnicodeDecodeError) or a value the model rejects (ValueError, e.g. a bad config.json), each with a message
# that names it; reported as `error: ...` and exit status 1.
USER_ERRORS = (FileNotFoundError, CheckpointError, TokenizerError, UnicodeDecodeError, ValueError)
DTYPES = {"float32": np.float32, "float64": np.float64}


def add_model_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="a Hugging Face JetMoE directory: config.json, model.safetensors (or shards), "
                             "tokenizer.json")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="cpu: the NumPy reference (default); gpu: the CuPy twin (JETMOE_GPU=emulate runs it on "
                             "the CPU emulator)")


def load(model_dir, dtype, device="cpu", finite=True):
    """(JetMoeForCausalLM, Tokenizer) from an HF directory; errors name the missing directory or file. Converting
    the weights at load shows a progress bar when it takes more than a second. finite=False keeps weights that
    hold NaN or inf (debug dump writes what such a model computes). device="gpu": the CuPy twin (jetmoe/device.py)."""
    check_model_directory(model_dir)
    JetMoeConfig.from_pretrained(model_dir)  # a bad config.json is named as such before the tokenizer reads it
    tokenizer = Tokenizer.from_pretrained(model_dir)
    if device == "gpu":
        model = load_gpu(model_dir, dtype)
        tokenizer.check_fits(model.config.vocab_size, f"{model_dir}/tokenizer.json")
        return model, tokenizer
    with tqdm(desc="converting weights", unit="B", unit_scale=True, delay=1, leave=False) as bar:
        def progress(done, total, unit):
            bar.total = total
            bar.update(done - bar.n)
        model = JetMoeForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], progress=progress, finite=finite)
    tokenizer.check_fits(model.config.vocab_size, f"{model_dir}/tokenizer.json")
    return model, tokenizer


def check_model_directory(model_dir):
    """An error naming what is wrong with a model path: missing, or a file (often its config.json) for the
    directory that holds it."""
    if os.path.isfile(model_dir):
        raise ValueError(f"{model_dir!r} is a file: give the model directory that holds config.json, the weights "
                         f"and tokenizer.json ({os.path.dirname(model_dir) or '.'!r})")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")


def training_context(model_dir):
    """Tokens per training window, from the train_log.json our training scripts write beside the weights; None
    when the directory has none (a hub checkpoint). A bad file is reported, not guessed around."""
    path = files.inside(model_dir, "train_log.json")
    if not files.present(path):
        return None
    log = files.read_json_object(path, "train_log")
    train = log.get("train")
    tokens = train.get("tokens") if isinstance(train, dict) else None
    if tokens is None:
        raise ValueError(f"{path} is not a training log with train.tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"{path}: train.tokens must be an integer >= 2, got {files.shown(tokens)}")
    return tokens


class PeakMemory:
    """Samples this process's memory every 10 ms while it runs (`with PeakMemory() as peak:`): .anon is the peak
    RssAnon, its own memory; .resident the peak VmHWM, which also counts mapped checkpoint pages (page cache)."""

    def __enter__(self):
        self.anon = status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.anon = max(self.anon, status_bytes("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.anon = max(self.anon, status_bytes("RssAnon"))
        self.resident = status_bytes("VmHWM")

    def __str__(self):
        return f"peak memory {self.anon / 2**30:.2f} GiB anonymous, {self.resident / 2**30:.2f} GiB resident"


def status_bytes(field):
    """A /proc/self/status field in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_prompts(prompts):
    """ValueError for a missing or empty prompt: a model continues text, it cannot start from nothing."""
    if not prompts:
        raise ValueError("give a prompt, e.g. --prompt 'ROMEO:'")
    for prompt in prompts:
        if not prompt.strip():
            raise ValueError("the prompt is empty: give some text to continue, e.g. --prompt 'ROMEO:'")


def non_negative_int(text):
    value = number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_int(text):
    value = number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_float(text):
    value = number(text, float)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def probability(text):
    value = number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def number(text, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None

"""What the command-line tools share: loading a model directory with its tokenizer, argument checks, and turning
a bad input into one line on stderr and a non-zero exit instead of a traceback."""

import argparse
import os
import sys

import numpy as np

from .checkpoint import CheckpointError
from .model import JetMoeForCausalLM
from .tokenizer import Tokenizer, TokenizerError

# What a user can get wrong: a path or file (FileNotFoundError, CheckpointError, TokenizerError), text that is not
# UTF-8 (UnicodeDecodeError) or a value the model rejects (ValueError, e.g. a bad config.json), each with a message
# that names it; reported as `error: ...` and exit status 1.
USER_ERRORS = (FileNotFoundError, CheckpointError, TokenizerError, UnicodeDecodeError, ValueError)
DTYPES = {"float32": np.float32, "float64": np.float64}


def run(main, argv=None):
    """Calls main(argv); a USER_ERRORS exception becomes `error: <message>` on stderr and exit status 1."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def add_model_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="a Hugging Face JetMoE directory: config.json, model.safetensors (or shards), "
                             "tokenizer.json")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")


def load(model_dir, dtype):
    """(JetMoeForCausalLM, Tokenizer) from an HF directory; errors name the missing directory or file."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = JetMoeForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TokenizerError(f"{model_dir}/tokenizer.json has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {model.config.vocab_size}")
    return model, tokenizer


def check_prompts(prompts):
    """ValueError for a missing or empty prompt: a model continues text, it cannot start from nothing."""
    if not prompts:
        raise ValueError("give a prompt, e.g. --prompt 'ROMEO:'")
    for prompt in prompts:
        if not prompt.strip():
            raise ValueError("the prompt is empty: give some text to continue, e.g. --prompt 'ROMEO:'")


def non_negative_int(text):
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_int(text):
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_float(text):
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text):
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None

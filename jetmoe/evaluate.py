"""Loss and perplexity of a JetMoE checkpoint on a text file, with the NumPy reference.

    jetmoe evaluate --model weights/jetmoe-tiny-shakespeare --text-file build/corpus/validation.txt

The text is tokenized once (bos first, as the tokenizer adds it) and cut into consecutive windows of --context
tokens (reference.losses.windows); each window is scored on its own (its first token has no context, so it is not
predicted), and the loss is the mean next-token cross-entropy over every predicted token, in nats
(reference.losses.mean_loss). Perplexity = exp(loss). The default context is the window the model was trained on
(its train_log.json), else max_position_embeddings, at most 512.
"""

import argparse
import math
import os

from tqdm import tqdm

from reference.io import files
from reference.losses import mean_loss

from . import cli, finite


def read_text(path):
    """The UTF-8 text of --text-file: a regular file (a FIFO is refused, not waited on), at most
    reference.io.files.LIMITS["text"] bytes."""
    if os.path.isdir(path):
        raise ValueError(f"--text-file {path!r} is a directory: give a UTF-8 text file")
    if not files.present(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    return files.read_text(path, "text")


def context_length(text):
    """--context: a window predicts from its second token on, so it needs at least 2."""
    value = cli.number(text, int)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (a window of one token predicts nothing), "
                                         f"got {text}")
    return value


def with_progress(model, bar):
    """model's forward, advancing bar by the tokens of each batch it scores (mean_loss calls only the forward)."""
    def forward(**inputs):
        out = model(**inputs)
        bar.update(inputs["input_ids"].size)
        return out
    return forward


def add_arguments(parser):
    cli.add_model_arguments(parser)
    parser.add_argument("--text-file", required=True, help="UTF-8 text to score")
    parser.add_argument("--context", type=context_length, default=None,
                        help="tokens per window (default: the model's training window from its train_log.json, "
                             "else max_position_embeddings, at most 512)")
    parser.add_argument("--batch", type=cli.positive_int, default=8, help="windows per forward pass (default 8)")
    parser.set_defaults(run=main)


def main(args):
    text = read_text(args.text_file)  # before loading the model: a bad file fails fast
    if not text.strip():
        raise ValueError(f"{args.text_file} holds no text")
    trained = cli.training_context(args.model)  # None where the directory (or its train_log.json) is missing
    model, tokenizer = cli.load(args.model, args.dtype, args.device)
    limit = model.config.max_position_embeddings
    context = args.context or trained or min(limit, 512)
    if context > limit:
        raise ValueError(f"--context {context} is longer than max_position_embeddings={limit} of {args.model}")
    ids = tokenizer.encode(text)
    with tqdm(total=len(ids), desc="scoring", unit="tok", unit_scale=True, disable=None) as bar:  # stderr, TTY only
        loss, count = mean_loss(with_progress(model, bar), ids, context, args.batch)
    finite.check_loss(loss, model, ids, context)
    print(f"tokens:     {count} predicted ({len(ids)} in windows of up to {context})")
    print(f"loss:       {loss:.4f} nats/token")
    print(f"perplexity: {math.exp(loss):.2f}")
    return 0

"""Generate text from a JetMoE checkpoint with the NumPy reference, streaming it as it comes.

    jetmoe generate --model weights/jetmoe-tiny-shakespeare --prompt "ROMEO:" --max-new-tokens 200

Works on any Hugging Face JetMoE directory (config.json, model.safetensors or shards, tokenizer.json). Several
--prompt flags make one left-padded batch, printed when all are done (B texts growing at once cannot share one
terminal stream); a single prompt streams. It ends with the
speed (tokens/s) and the expert load: the share of top-k choices each expert of each layer got on the text.
The same --seed gives the same text for the same prompts: a batch draws from one Generator, row after row, so a
prompt in a batch gets other draws than the same prompt alone.
"""

import contextlib
import sys
import time

import numpy as np

from reference.generation import positions_from_mask
from reference.routing import expert_load, format_expert_load

from . import cli, finite, roofline


def add_arguments(parser):
    cli.add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue; repeat the flag for a batch of prompts (left-padded)")
    parser.add_argument("--max-new-tokens", type=cli.non_negative_int, default=200,
                        help="most tokens generated per prompt (default 200; eos stops earlier)")
    parser.add_argument("--temperature", type=cli.non_negative_float, default=0.8,
                        help="softmax temperature (default 0.8); 0 means greedy decoding")
    parser.add_argument("--top-k", type=cli.non_negative_int, default=50,
                        help="sample from the k most likely tokens only (default 50; 0: no limit)")
    parser.add_argument("--top-p", type=cli.probability, default=0.95,
                        help="sample from the smallest set of tokens holding this probability (default 0.95; 1: all)")
    parser.add_argument("--seed", type=cli.non_negative_int, default=0,
                        help="seed of the sampling Generator (default 0)")
    parser.add_argument("--no-stats", action="store_true", help="print only the text, not speed and expert load")
    parser.add_argument("--stats", action="store_true",
                        help="per token: bytes of distinct weights read (routed experts, the rest) and the share of "
                             "the machine's copy bandwidth reached (jetmoe/roofline.py)")
    parser.set_defaults(run=main)


def encode_prompts(tokenizer, prompts, max_new_tokens, config, model_dir):
    """Left-padded ids [B, T] and mask [B, T]; a clear error for an empty prompt or one that cannot fit."""
    cli.check_prompts(prompts)
    ids, mask = tokenizer.encode_batch(prompts)
    longest = int(mask.sum(axis=1).max())
    limit = config.max_position_embeddings
    if longest > limit:
        raise ValueError(f"the prompt is {longest} tokens, longer than max_position_embeddings={limit} of "
                         f"{model_dir}")
    if longest + max_new_tokens > limit:
        raise ValueError(f"the prompt is {longest} tokens, so --max-new-tokens {max_new_tokens} would go past "
                         f"max_position_embeddings={limit} of {model_dir}: use --max-new-tokens "
                         f"{limit - longest} or less")
    return ids, mask



def main(args):
    model, tokenizer = cli.load(args.model, args.dtype, args.device)
    config = model.config
    ids, mask = encode_prompts(tokenizer, args.prompt, args.max_new_tokens, config, args.model)
    warn_past_training_context(int(mask.sum(axis=1).max()) + args.max_new_tokens, args.model)
    warn_unlearned_characters(args.prompt, tokenizer)
    streaming = len(args.prompt) == 1
    if not streaming:
        print(f"{len(args.prompt)} prompts: each text is printed when the batch is done (rows growing at once cannot "
              "share one stream; one --prompt streams)", file=sys.stderr)
    stream = tokenizer.stream(ids[0, mask[0] == 1])  # knows the prompt, so the first word keeps its space
    if streaming:
        print(args.prompt[0], end="", flush=True)

    recorder = roofline.StepRecorder() if args.stats else None

    def print_new_text(new_tokens):  # new_tokens: [B]
        if recorder is not None:
            recorder.token(new_tokens)
        if not streaming:
            return
        text = stream.push(int(new_tokens[0]))
        if text:
            print(text, end="", flush=True)

    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed) if args.temperature > 0 else dict(do_sample=False)
    started = time.perf_counter()
    # the reference checks each step's logits; the twin's steps are replays of one CUDA graph (gpu/graph.py)
    checked = dict(stepper=finite.checked_stepper) if args.device == "cpu" else {}
    with cli.PeakMemory() as peak, recorder.recording() if recorder else contextlib.nullcontext():
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                streamer=print_new_text if streaming or recorder else None, **checked, **sampling)
    seconds = time.perf_counter() - started
    new = tokens[:, ids.shape[1]:]  # [B, new]
    lengths = np.array([generated_length(row, config) for row in new])  # [B]: the pads after an eos excluded
    new_mask = (np.arange(new.shape[1])[None, :] < lengths[:, None]).astype(np.int64)  # [B, new]
    full_mask = np.concatenate([mask, new_mask], axis=1)  # [B, T + new]
    if streaming:
        print(stream.flush())
    else:
        for prompt, row, row_mask in zip(args.prompt, tokens, full_mask):
            print(f"--- prompt {prompt!r}\n{tokenizer.decode(row[row_mask == 1])}\n")
    if args.no_stats:
        return 0
    generated = int(lengths.sum())
    print(f"\n{generated} new tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s "
          f"(batch {len(args.prompt)}, {args.dtype}, prompt {ids.shape[1]} tokens); {peak}", file=sys.stderr)
    out = model.model(input_ids=tokens, attention_mask=full_mask, position_ids=positions_from_mask(full_mask),
                      output_router_logits=True, use_cache=False)
    load = expert_load(out.router_logits, config.num_experts_per_tok, keep=full_mask.reshape(-1) == 1)
    print(format_expert_load(load, config.num_hidden_layers), file=sys.stderr)
    print(expert_load_footer(int(full_mask.sum()), config), file=sys.stderr)
    if recorder is not None:
        print(roofline.format_stats(roofline.token_stats(model, recorder), *roofline.copy_bandwidth()),
              file=sys.stderr)
    return 0


# Fewer top-k choices per expert than this on average, and a 0% cell is chance, not a dead expert (at 10 and uniform
# routing, an expert gets no choice with probability (1 - 1/E)^(10 E), under 1e-4 for E = 8).
MIN_CHOICES_PER_EXPERT = 10


def expert_load_footer(tokens, config):
    """The count behind the expert-load table's shares; a run too short to call an expert dead says so."""
    choices = tokens * config.num_experts_per_tok
    line = f"on {tokens} tokens: {choices} top-k choices per router"
    enough = -(-MIN_CHOICES_PER_EXPERT * config.num_local_experts // config.num_experts_per_tok)  # tokens
    if tokens < enough:
        line += (f"; too few to judge an expert: a 0% cell is 0 of these {choices} choices, not a dead expert "
                 f"({enough}+ tokens give each expert {MIN_CHOICES_PER_EXPERT} choices on average)")
    return line


def generated_length(row, config):
    # row: [new] -> tokens up to and including the first eos (the rest is padding added after it)
    ends = np.flatnonzero(np.isin(row, config.eos_token_ids))
    return int(ends[0]) + 1 if ends.size else row.size


def warn_unlearned_characters(prompts, tokenizer):
    """One warning for the prompts' characters the tokenizer learned no token for: they go in as raw bytes, which
    a model trained on ASCII text (the bundled one: its model card) never saw."""
    unlearned = sorted({c for prompt in prompts for c in prompt if not c.isascii()
                        and not any(c in tokenizer.decode([i]) for i in tokenizer.encode(c))})
    if unlearned:
        print(f"warning: the tokenizer learned no token for {', '.join(map(repr, unlearned))}: they go in as raw "
              "bytes the model likely never saw in training (an ASCII-only tokenizer), and the text near them "
              "suffers", file=sys.stderr)


def warn_past_training_context(total_tokens, model_dir):
    """A warning when prompt plus new tokens pass the window the model was trained on (its train_log.json):
    positions past it were never seen in training, and the text falls apart there."""
    trained = cli.training_context(model_dir)
    if trained is not None and total_tokens > trained:
        print(f"warning: prompt plus --max-new-tokens is {total_tokens} tokens, past the {trained}-token context "
              f"{model_dir} was trained on (its train_log.json): text past token {trained} falls apart",
              file=sys.stderr)

"""The `jetmoe` command: one entry point for the tools over the reference (and the GPU twin).

    jetmoe generate --model weights/jetmoe-tiny-shakespeare --prompt "ROMEO:"
    jetmoe evaluate --model MODEL --text-file build/corpus/validation.txt --context 256
    jetmoe debug compare MODEL hf --prompt "ROMEO:"
    jetmoe debug dump MODEL --prompt "ROMEO:" --out trace.safetensors
    jetmoe train --config configs/jetmoe-tiny-shakespeare.json --out build/train/tiny

`python -m jetmoe` is the same command. Each tool is a module with add_arguments(parser) and a run(args) it sets;
`debug dump` and `debug compare` with --backward run jetmoe/debug_backward.py's twins. What the tools share is in
jetmoe/cli.py.
"""

import argparse
import sys

import numpy as np

from . import cli, debug, debug_backward, evaluate, generate, train

TOOLS = (generate, evaluate, debug, train)
BACKWARD = {"dump": debug_backward.run_dump_backward, "compare": debug_backward.run_compare_backward}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one `error:` line that points to --help (not the whole usage block);
    subcommands' parsers are of the same class."""

    def error(self, message):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def parser():
    """The whole command line: one subcommand per tool, each module adding its own arguments."""
    top = Parser(prog="jetmoe", description=__doc__.split("\n")[0])
    tools = top.add_subparsers(dest="tool", required=True, metavar="{generate,evaluate,debug,train}")
    for module in TOOLS:
        name = module.__name__.rsplit(".", 1)[1]
        summary = module.__doc__.split("\n")[0]
        module.add_arguments(tools.add_parser(name, help=summary, description=summary))
    return top


def main(argv=None):
    """Runs one tool; a USER_ERRORS exception becomes `error: <message>` on stderr and exit status 1, Ctrl-C exit
    status 130 (`jetmoe train` catches the first Ctrl-C itself to write a checkpoint)."""
    args = parser().parse_args(argv)
    run = BACKWARD[args.command] if getattr(args, "backward", False) else args.run
    try:  # NaN and inf are checked where they matter (jetmoe/finite.py names the trace point): no per-op warnings
        with np.errstate(all="ignore"):
            return run(args)
    except cli.USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT, not a traceback
        print("error: interrupted", file=sys.stderr)
        return 130


def console_main():
    """The console-script entry point declared in pyproject.toml."""
    sys.exit(main())

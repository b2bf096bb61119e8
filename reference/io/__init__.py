"""The model's IO and runtime, apart from its math: what reads and writes files and what makes a big checkpoint run.

  files        the one guarded way into a model folder (an untrusted input: docs/security.md)
  safetensors  the format's one reader (its header checked as strictly as the library checks it) and writer
  checkpoint   HF checkpoints: config + safetensors shards -> named tensors, and back
  mapped       the big-checkpoint runtime: bf16 weights left memory-mapped, converted block by block, on threads
  tokenizer    tokenizer.json through the tokenizers library
  trace        named intermediates of a forward: capture, substitute, break at, step through (notebook 07)
  trace_files  a trace on disk: save, load, write as the forward goes, check a port's file
  compare      two traces name by name: rows with verdicts, and their table

Shapes: reference/__init__.py.
"""

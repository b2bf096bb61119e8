"""The tools over the JetMoE model packages: the `jetmoe` command (jetmoe/command.py) and the Hugging Face oracle
adapters (hf_oracle, hf_trace). The only package that may import both `reference` and `gpu`; neither of them
imports this one."""

import os

# One OpenBLAS thread unless the user sets OPENBLAS_NUM_THREADS: OpenBLAS's threads spin while they wait, and where
# the cores are busy they fight the project's own threads (reference/io/mapped.py) and other processes for them
# (docs/benchmarks.md: jetmoe evaluate three to four times faster with one). Set here, before the command
# imports NumPy, which reads it once when it loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

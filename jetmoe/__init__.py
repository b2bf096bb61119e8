"""The tools over the JetMoE model packages: the `jetmoe` command (jetmoe/cli.py) and the Hugging Face oracle
adapters (hf_oracle, hf_trace). The only package that may import both `reference` and `gpu`; neither of them
imports this one."""

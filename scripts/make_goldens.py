"""Write tests/golden/<name>/: HF-saved float64 checkpoints, inputs, and every HF output in float64.

Run with `make goldens` (needs the oracle extra: transformers==4.56.2 and CPU torch). Each config directory
holds config.json + model.safetensors (HF JetMoeForCausalLM.save_pretrained), seqcls/ (the same base weights
with a random score head), inputs.safetensors, and outputs_float64 / outputs_float32 .safetensors: the HF
outputs with the model loaded in that dtype (float64 with the float32 islands promoted, see hf_oracle.py).
"""

import argparse
import json
import os

import numpy as np
import torch

from jetmoe import hf_oracle
from reference.io.safetensors import write_safetensors

# At least: top-k 1 and top-k = E, a single kv head, odd sizes, untied embeddings, rms_norm_eps != 1e-6 and a
# rope_theta other than 10000. The sizes stay tiny so the goldens are small and the tests fast.
CONFIGS = {
    "topk1_untied": dict(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                         intermediate_size=20, num_local_experts=4, num_experts_per_tok=1, tie_word_embeddings=False,
                         rms_norm_eps=1e-5, rope_theta=500.0, pad_token_id=0, eos_token_id=2, bos_token_id=1),
    "topk_all_single_kv_head": dict(vocab_size=61, hidden_size=18, num_hidden_layers=3, num_key_value_heads=1,
                                    kv_channels=6, intermediate_size=14, num_local_experts=3, num_experts_per_tok=3,
                                    tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0,
                                    pad_token_id=5, eos_token_id=2, bos_token_id=1),
    "odd_sizes": dict(vocab_size=113, hidden_size=30, num_hidden_layers=2, num_key_value_heads=3, kv_channels=10,
                      intermediate_size=22, num_local_experts=5, num_experts_per_tok=2, tie_word_embeddings=False,
                      rms_norm_eps=3e-4, rope_theta=1e6, pad_token_id=0, eos_token_id=7, bos_token_id=1),
    "jetmoe_like": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_key_value_heads=4, kv_channels=8,
                        intermediate_size=44, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=True,
                        rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0, eos_token_id=2, bos_token_id=1),
}
COMMON = dict(max_position_embeddings=64, aux_loss_coef=0.01, num_labels=3)
MIN_ROUTER_MARGIN = hf_oracle.MIN_ROUTER_MARGIN


def build_checkpoint(name, values, out_dir, seed):
    """Random HF model saved with HF's save_pretrained; reseeds until every top-k routing margin is clear."""
    for attempt in range(20):
        hf_oracle.save_checkpoint(values, out_dir, seed + attempt, score_seed=seed)
        yield seed + attempt


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "golden"))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    hf_oracle.check_versions(semantics=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for index, (name, values) in enumerate(CONFIGS.items()):
        values = {**COMMON, **values}
        out_dir = os.path.join(args.out, name)
        rng = np.random.default_rng(args.seed + index)
        inputs = hf_oracle.make_inputs(values, rng)
        for seed in build_checkpoint(name, values, out_dir, args.seed + 100 * index):
            outputs = {label: hf_oracle.run_checkpoint(out_dir, dtype, inputs)
                       for dtype, label in [(torch.float64, "float64"), (torch.float32, "float32")]}
            margin = float(outputs["float64"]["router_margin"])
            if margin > MIN_ROUTER_MARGIN:
                break
            print(f"{name}: seed {seed} has a top-k router margin of {margin:.2e}, reseeding")
        else:
            raise RuntimeError(f"{name}: no seed gave clear routing margins")
        for label, result in outputs.items():
            write_safetensors(os.path.join(out_dir, f"outputs_{label}.safetensors"),
                              {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v.astype(np.int64)
                               for k, v in result.items()})
        write_safetensors(os.path.join(out_dir, "inputs.safetensors"), inputs)
        with open(os.path.join(out_dir, "golden_info.json"), "w") as f:
            json.dump({"seed": seed, "router_margin": margin, "transformers": hf_oracle.transformers.__version__,
                       "torch": torch.__version__}, f, indent=2)
        print(f"{name}: wrote {out_dir} (seed {seed}, router margin {margin:.3g})")


if __name__ == "__main__":
    main()

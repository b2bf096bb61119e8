"""What differs between the transformers versions our HF adapters run on, found by looking at the installed one.

The pinned 4.56.2 defines the semantics; the pinned newest 5.x is a second oracle (docs/transformers.md lists every
difference). Each check below asks the installed transformers what it does (a signature, a source, an attribute)
rather than comparing version strings, so a release in between is handled by what it is.
"""

import inspect

SEMANTICS_TRANSFORMERS = "4.56.2"  # its JetMoe defines the reference's semantics (goldens come from it)
LATEST_TRANSFORMERS = "5.25.0"  # the newest 5.x, pinned in the oracle-latest extra
ORACLE_VERSIONS = (SEMANTICS_TRANSFORMERS, LATEST_TRANSFORMERS)


def cache_argument(hf_module):
    """The name forward() takes the KV cache by: `past_key_values` (4.56.2) or `cache` (5.25)."""
    parameters = inspect.signature(hf_module.JetMoeForCausalLM.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output):
    """The KV cache an HF model output returns: field `past_key_values` (4.56.2) or `cache` (5.25)."""
    return getattr(output, "cache" if "cache" in type(output).__dataclass_fields__ else "past_key_values")


def first(output):
    """A module's main output: 4.56.2's layers and MoE return tuples, 5.x's a bare tensor."""
    return output[0] if isinstance(output, tuple) else output


def rope_theta(hf_module, config):
    """RoPE's base as the installed HF reads it: 5.x from config.rope_parameters, 4.56.2 from config.rope_theta (a
    5.x config.json read by 4.56.2 keeps rope_parameters as an unused attribute, and the default base)."""
    if "rope_parameters" in inspect.getsource(hf_module.JetMoeRotaryEmbedding):
        return config.rope_parameters["rope_theta"]
    return config.rope_theta

"""What every oracle test module needs first: torch and transformers==4.56.2, or a skip of the whole module.

    torch, transformers = require_oracle()     # at the top of a tests/oracle/ module, before importing jetmoe's HF side

The skip names what to install; `make test-oracle` installs the oracle extra, so CI runs these tests, never skips.
"""

import pytest

REQUIRED_TRANSFORMERS = "4.56.2"  # its JetMoe defines our semantics


def require_oracle():
    torch = pytest.importorskip("torch", reason="live oracle tests need torch (make setup-oracle)")
    transformers = pytest.importorskip("transformers", reason="live oracle tests need transformers==4.56.2 "
                                                              "(make setup-oracle)")
    if transformers.__version__ != REQUIRED_TRANSFORMERS:
        pytest.skip(f"live oracle tests need transformers=={REQUIRED_TRANSFORMERS} (its JetMoe defines our "
                    f"semantics), found {transformers.__version__}", allow_module_level=True)
    return torch, transformers

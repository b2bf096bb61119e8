"""What every oracle test module needs first: torch and a pinned transformers, or a skip of the whole module.

    torch, transformers = require_oracle()     # at the top of a tests/oracle/ module, before importing jetmoe's HF side

Two oracles: transformers 4.56.2 defines our semantics (`make test-oracle`), the pinned newest 5.x is the second
(`make test-oracle-latest`, its own .venv-latest). The forward math is the same in both, so most modules run on
either; where the versions differ (docs/transformers.md) a test asserts what the installed one does. The skip names
what to install; CI runs both targets, so these tests never skip there.
"""

import pytest

from jetmoe.hf_compat import LATEST_TRANSFORMERS, ORACLE_VERSIONS, SEMANTICS_TRANSFORMERS


def require_oracle(semantics_only=False):
    """(torch, transformers); semantics_only: the module checks 4.56.2's own behaviour (goldens, its known bugs)."""
    torch = pytest.importorskip("torch", reason="live oracle tests need torch (make setup-oracle)")
    transformers = pytest.importorskip("transformers", reason="live oracle tests need transformers "
                                                              f"{' or '.join(ORACLE_VERSIONS)} (make setup-oracle)")
    allowed = (SEMANTICS_TRANSFORMERS,) if semantics_only else ORACLE_VERSIONS
    if transformers.__version__ not in allowed:
        pytest.skip(f"live oracle tests need transformers {' or '.join(allowed)} (4.56.2 defines our semantics, "
                    f"{LATEST_TRANSFORMERS} is the second oracle), found {transformers.__version__}",
                    allow_module_level=True)
    return torch, transformers


def is_latest():
    """True under the second oracle (the pinned newest transformers 5.x)."""
    import transformers
    return transformers.__version__ == LATEST_TRANSFORMERS

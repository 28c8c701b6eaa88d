"""The language-model workload: a small GPT-2 trained offline on English text, activation
caches of any Hugging Face causal LM, and SAEs judged by the LM loss with their
reconstruction spliced in. Needs the `lm` extra (torch, transformers, tokenizers):
`pip install -r requirements-lm.txt`; the rest of ksae_jax imports without it."""
from __future__ import annotations

INSTALL = "pip install -r requirements-lm.txt  (torch==2.13.0, transformers, tokenizers)"


class LMUnavailable(RuntimeError):
    """torch, transformers or tokenizers is not installed."""


def require(torch: bool = True) -> None:
    """Raises LMUnavailable naming what to install when the lm extra is missing (torch=False:
    all but torch, what the JAX LM path needs)."""
    names = ("torch", "transformers", "tokenizers") if torch else ("transformers", "tokenizers")
    missing = [name for name in names if not _importable(name)]
    if missing:
        raise LMUnavailable(f"the LM commands need {', '.join(missing)}: {INSTALL}")


def _importable(name: str) -> bool:
    """Looks the package up without importing it (transformers warns on import without torch)."""
    import importlib.util
    import sys
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None

"""A Hugging Face causal LM as the SAE workload sees it: loaded from a local folder or a hub
name, and its transformer blocks found (lm.hookpoints reads and replaces activations)."""
from __future__ import annotations

from pathlib import Path


class LMError(ValueError):
    """A model that cannot be loaded, or a layer it does not have."""


def load(name_or_dir: str):
    """(model in eval mode, tokenizer) from a local folder (save_pretrained's) or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # the run's own bars count tokens and steps
    path = Path(name_or_dir).expanduser()
    local = path.exists() or str(name_or_dir).startswith((".", "/", "~"))
    if local and not path.is_dir():
        raise LMError(f"{name_or_dir}: no such model folder")
    try:
        source = str(path) if local else str(name_or_dir)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        where = "folder" if local else "hub name (no network?)"
        raise LMError(f"{name_or_dir}: not a loadable causal LM {where}: "
                      f"{str(e).splitlines()[0][:200]}") from None
    model.eval()
    return model, tokenizer


def blocks(model):
    """The model's list of transformer blocks (GPT-2's transformer.h, Llama's model.layers,
    GPT-NeoX's gpt_neox.layers, ...): its ModuleList with one entry per hidden layer."""
    import torch

    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise LMError(f"{type(model).__name__}: no list of {n} transformer blocks found")


def check_layer(model, layer: int) -> None:
    n = model.config.num_hidden_layers
    if not 0 <= layer < n:
        raise LMError(f"layer {layer} does not exist: the model has blocks 0..{n - 1}")


def max_positions(model) -> int | None:
    """The longest context the model takes (learnt position embeddings), or None."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


def check_context(model, context: int) -> None:
    """LMError when contexts of `context` tokens are longer than the model takes."""
    positions = max_positions(model)
    if positions is not None and context > positions:
        raise LMError(f"--context {context}: the model takes at most {positions} positions")


def bos_id(tokenizer) -> int:
    """The token every context starts with: BOS, or EOS where the model has none (GPT-2)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise LMError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    return token

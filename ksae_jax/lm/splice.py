"""The field's test of an SAE on a language model: the model's next-token loss on held-out
text with the residual stream after block L replaced by the SAE's reconstruction, beside the
clean loss and the zero-ablated one (SAELens's ce_loss_score):

    loss_recovered = (L_zero - L_sae) / (L_zero - L_clean),   delta_loss = L_sae - L_clean,

and the KL divergence of the spliced model's next-token distribution from the clean one.
Every position but BOS is replaced (BOS is never cached, so never trained on); losses are
averaged over the predictions made at replaced positions, in nats per token and in bits per
byte of the predicted text. The SAE runs in JAX: the activations go from torch to JAX and
back through DLPack (no host copy when both sit on one device).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path


import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax.lm import hookpoints as hooks
from ksae_jax.lm import jax_lm
from ksae_jax.lm import model as lm_model
from ksae_jax.lm import offline_lm, text

Replacement = Callable  # torch (B, T, d) -> torch (B, T, d)


def eval_windows(tokenizer, docs: list[str], n_tokens: int, context: int) -> np.ndarray:
    """Consecutive contexts (BOS + context - 1 tokens) of the documents' stream, enough for
    n_tokens predictions at replaced positions (context - 2 per context)."""
    stream = offline_lm.token_stream(tokenizer, docs)
    per = context - 1
    n = min(-(-n_tokens // (context - 2)), (len(stream) - 1) // per)
    if n < 1:
        raise ValueError(f"the held-out text gives no context of {context} tokens")
    return offline_lm.windows(stream, np.arange(n) * per, context, lm_model.bos_id(tokenizer))


def _logprobs(model, where, ids, replace: Replacement | None):
    import torch

    def splice(h):
        return torch.cat([hooks.written(where, h[:, :1]), replace(h[:, 1:])], dim=1)

    with torch.no_grad():
        if replace is None:
            logits = model(ids).logits
        else:
            with hooks.replace(model, where, splice):
                logits = model(ids).logits
    return torch.log_softmax(logits[:, 1:-1].float(), dim=-1).cpu().numpy()


def _torch_passes(model, where, windows: np.ndarray):
    """(clean log-probs, spliced(replace) -> log-probs) of a torch model on a batch."""
    import torch
    ids = torch.from_numpy(windows).long().to(model.device)
    return _logprobs(model, where, ids, None), lambda r: _logprobs(model, where, ids, r)


def _jax_passes(lm, where, windows: np.ndarray):
    """The same of a jax_lm.JaxLM: the clean pass gives the hookpoint's activations and its
    block's input, from which each spliced pass runs only the blocks from there on."""
    ids = jnp.asarray(windows, jnp.int32)
    clean, acts, block_in = _jax_clean(lm.spec, lm.weights, ids, where.path)

    def spliced(replace):
        rows = acts[:, 1:].reshape(-1, acts.shape[-1])
        new = replace(rows).reshape(acts.shape[0], acts.shape[1] - 1, -1)
        return np.asarray(_jax_spliced(lm.spec, lm.weights, ids, where.path, block_in, new))

    return np.asarray(clean), spliced


_jax_clean = jax.jit(jax_lm.clean_pass, static_argnums=(0, 3))
_jax_spliced = jax.jit(jax_lm.spliced_pass, static_argnums=(0, 3))


def _passes(model):
    return _jax_passes if isinstance(model, jax_lm.JaxLM) else _torch_passes


token_bytes = offline_lm.token_bytes


def spliced_losses(model, where, windows: np.ndarray, nbytes: np.ndarray,
                   replacements: dict[str, Replacement], batch: int = 16) -> dict:
    """{"clean", "zero", label: ...} each {"loss" (nats/token), "bits_per_byte", "kl"} (KL of
    the spliced from the clean distribution, nats/token), over the targets 2..T-1 of windows,
    with the replacements spliced in at `where` (a hookpoints.Hookpoint). model: a torch
    model (replacements of torch tensors) or a jax_lm.JaxLM (of JAX arrays)."""
    variants = {"zero": _zeros(model, where), **replacements}

    def passes(ids):
        clean, spliced = _passes(model)(model, where, ids)
        return clean, {name: spliced(replace) for name, replace in variants.items()}

    return accumulate(windows, nbytes, passes, batch)


def accumulate(windows: np.ndarray, nbytes: np.ndarray, passes, batch: int) -> dict:
    """The losses and KLs of every variant, batch after batch of windows: passes(ids) gives
    (clean log-probs, {name: log-probs}) of the predictions 1..T-2."""
    sums: dict = {"clean": {"nll": 0.0, "kl": 0.0}}
    count, total_bytes = 0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        targets = ids[:, 2:, None]
        clean, spliced = passes(ids)
        for name, lp in {"clean": clean, **spliced}.items():
            s = sums.setdefault(name, {"nll": 0.0, "kl": 0.0})
            s["nll"] -= float(np.take_along_axis(lp, targets, -1).sum(dtype=np.float64))
            s["kl"] += float((np.exp(clean) * (clean - lp)).sum(dtype=np.float64))
        count += targets.size
        total_bytes += int(nbytes[targets].sum())
    return {name: {"loss": s["nll"] / count, "bits_per_byte": s["nll"] / math.log(2) / total_bytes,
                   "kl": s["kl"] / count} for name, s in sums.items()} | {"tokens": count,
                                                                          "bytes": total_bytes}


def _zeros(model, where) -> Replacement:
    """The zero ablation of what the hookpoint writes."""
    if isinstance(model, jax_lm.JaxLM):
        return lambda h: jnp.zeros_like(hooks.written(where, h))
    import torch
    return lambda h: torch.zeros_like(hooks.written(where, h))


def scores(losses: dict, label: str) -> dict:
    """lm_loss_sae, delta_loss, loss_recovered, kl (and delta_bits_per_byte) of one replacement."""
    clean, zero, sae = losses["clean"], losses["zero"], losses[label]
    return {"lm_loss_sae": sae["loss"], "delta_loss": sae["loss"] - clean["loss"],
            "delta_bits_per_byte": sae["bits_per_byte"] - clean["bits_per_byte"],
            "loss_recovered": (zero["loss"] - sae["loss"]) / (zero["loss"] - clean["loss"]),
            "kl": sae["kl"]}


def sae_replacement(sae, k: int, model=None) -> Replacement:
    """h -> the reconstruction of every row of h by the SAE of k (ksae_jax.VectorSAE), run
    in JAX: on a JAX model's rows directly, on a torch tensor's own buffer (DLPack both ways)."""
    if isinstance(model, jax_lm.JaxLM):
        return lambda rows: sae.reconstruct_array(rows, k)
    import torch

    def replace(h):
        rows = jax.dlpack.from_dlpack(h.contiguous().reshape(-1, h.shape[-1]))
        new = torch.from_dlpack(sae.reconstruct_array(rows, k))
        return new.reshape(*h.shape[:-1], -1).to(h.dtype)

    return replace


class SpliceEval:
    """The spliced evaluation of a sweep's SAEs, set up once (model, layer, held-out contexts
    of the text's held-out documents) so that a bad model or layer is refused before training."""

    def __init__(self, model: str, layer: int, text_source: str, tokens: int, context: int,
                 hookpoint: str | None = None):
        """hookpoint: where at block `layer` (None: its output; mlp.L: its MLP, replaced by a
        transcoder's output)."""
        model_, tokenizer = lm_model.load(model)
        lm_model.check_layer(model_, layer)
        where = hooks.resolve(model_, [hookpoint or f"resid_post.{layer}"])[0]
        self.setup(model_, tokenizer, where, text.split(text.documents(text_source))[1], tokens,
                   context)
        self.layer, self.name = layer, model

    def setup(self, model, tokenizer, where, held_docs: list[str], tokens: int, context: int):
        lm_model.check_context(model, context)
        self.model, self.where = model, where
        self.windows = eval_windows(tokenizer, held_docs, tokens, context)
        self.nbytes = offline_lm.token_bytes(tokenizer)

    @classmethod
    def at(cls, model, tokenizer, where, held_docs: list[str], tokens: int, context: int,
           name: str) -> SpliceEval:
        """The evaluation at a hookpoint of a model already loaded."""
        self = cls.__new__(cls)
        self.setup(model, tokenizer, where, held_docs, tokens, context)
        self.layer, self.name = where.name, name
        return self

    def width(self) -> int:
        """The width of the activations at the hookpoint."""
        import torch

        ids = torch.from_numpy(self.windows[:1, :2]).long()
        return int(hooks.capture(self.model, [self.where], ids)[self.where.name].shape[-1])

    def losses(self, replacements: dict[str, Replacement]) -> dict:
        """spliced_losses of these replacements on the held-out contexts."""
        return spliced_losses(self.model, self.where, self.windows, self.nbytes, replacements)

    def __call__(self, sae, ks) -> dict:
        """metrics.json's LM fields: clean and zero-ablated losses, and per k (None where a k
        has no model) the spliced loss, delta_loss, loss_recovered and KL."""
        present = [k for k in ks if k in sae.labels]
        losses = self.losses({str(k): sae_replacement(sae, k, self.model) for k in present})
        per_k = {k: scores(losses, str(k)) for k in present}
        fields = ("lm_loss_sae", "delta_loss", "delta_bits_per_byte", "loss_recovered", "kl")
        return {"lm": self.name, "lm_layer": self.layer, "lm_hookpoint": self.where.name,
                "lm_tokens": losses["tokens"],
                "lm_loss_clean": losses["clean"]["loss"], "lm_loss_zero": losses["zero"]["loss"],
                "lm_bits_per_byte_clean": losses["clean"]["bits_per_byte"],
                **{f: [per_k[k][f] if k in per_k else None for k in ks] for f in fields}}


@dataclasses.dataclass(frozen=True)
class SpliceConfig:
    """The language model the vectors came from: each SAE is judged by the model's loss with
    its reconstruction spliced in (needs requirements-lm.txt)."""

    lm: str | None = None
    """The causal LM of the activations (a folder or a hub name): adds delta_loss,
    loss_recovered and KL to the run's metrics."""
    layer: int | None = None
    """The block whose output the activations are (None: the cache's meta.json says)."""
    lm_text: str | None = None
    """Text whose held-out documents are evaluated (None: the cache's, or gcide)."""
    lm_tokens: int = 16_384
    """Predictions evaluated."""

    def evaluation(self, data: Path) -> SpliceEval | None:
        """The evaluation set up (model, layer and text checked), or None without lm; the
        cache's meta.json beside `data` fills in what is not given."""
        if self.lm is None:
            return None
        meta = cache_meta(Path(data))
        layer = self.layer if self.layer is not None else meta.get("layer")
        if layer is None:
            raise ValueError("give --layer (no meta.json beside --data says which)")
        return SpliceEval(self.lm, layer, self.lm_text or meta.get("text", text.DEFAULT),
                          self.lm_tokens, meta.get("context", 128),
                          hookpoint=meta.get("hookpoint") if layer == meta.get("layer") else None)


def cache_meta(data: Path) -> dict:
    """The meta.json of the activation cache `data` belongs to (DIR/train -> DIR/meta.json)."""
    for folder in (data, data.parent):
        if (folder / "meta.json").is_file():
            return json.loads((folder / "meta.json").read_text())
    return {}


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """A saved SAE judged in its language model."""

    sae: Path
    """A trained SAE (or transcoder: judged with block L's MLP replaced): params.pkl, a
    ksae_jax export, or a sparsify / SAELens folder."""
    model: str
    """The causal LM of its activations."""
    layer: int
    """The block it reads."""
    text: str = text.DEFAULT
    """Text whose held-out documents are evaluated."""
    tokens: int = SpliceConfig.lm_tokens
    """Predictions evaluated."""
    context: int = 128
    """Tokens per context, BOS included."""
    out: Path | None = None
    """Write the metrics here (.json)."""


def evaluate(cfg: EvaluateConfig) -> dict:
    """`ksae evaluate`: the spliced evaluation of a saved SAE (every model it holds), printed
    (and written to cfg.out)."""
    import os

    import torch

    from ksae_jax import inference
    from ksae_jax.files import write_json
    from ksae_jax.safe_pickle import ParamsFileError

    torch.set_num_threads(os.cpu_count() or 1)
    evaluation = SpliceEval(cfg.model, cfg.layer, cfg.text, cfg.tokens, cfg.context)
    try:
        sae = inference.load(cfg.sae)
    except (ParamsFileError, OSError) as e:
        raise ValueError(f"--sae {cfg.sae}: {e}") from None
    kind = type(sae.model_config)
    if not hasattr(kind, "hookpoints_for"):
        raise ValueError(f"--sae {cfg.sae}: holds image models, not a language model's SAEs")
    where = kind.hookpoints_for([cfg.layer])[0]  # what it reads at the block
    try:
        kind.check_hookpoint(where)
    except ValueError as e:  # a CLT: several layers at once
        raise ValueError(f"--sae {cfg.sae}: {e}; its spliced metrics are in the metrics.json of "
                         "the run that trained it") from None
    evaluation.where = hooks.resolve(evaluation.model, [where])[0]
    labels = list(sae.labels)
    m = evaluation(sae, labels)
    print(f"clean {m['lm_loss_clean']:.4f}, zero-ablated {m['lm_loss_zero']:.4f} nats/token over "
          f"{m['lm_tokens']:,} tokens\n{sae.label_name:>7} {'delta loss':>11} {'recovered':>10} "
          f"{'KL':>8}")
    for i, k in enumerate(labels):
        print(f"{k!s:>7} {m['delta_loss'][i]:>11.4f} {m['loss_recovered'][i]:>10.4f} {m['kl'][i]:>8.4f}")
    if cfg.out is not None:
        write_json(cfg.out, {"sae": str(cfg.sae), sae.label_name + "s": labels, **m})
    return m

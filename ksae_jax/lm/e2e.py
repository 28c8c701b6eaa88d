"""End-to-end SAE training (Braun et al. 2024, "Identifying functionally important features
with end-to-end sparse dictionary learning"): the SAE's reconstruction is spliced into the
running JAX model and the loss is the KL divergence of the spliced model's next-token
distribution from the clean one, alone or beside the reconstruction loss:

    fvu:     the family's reconstruction loss (the default; no LM in the step)
    kl:      KL(clean || spliced), nats per predicted token
    fvu+kl:  reconstruction + kl_coef * KL

The gradient flows back through the blocks after the hookpoint into the SAE; the LM's
weights stay frozen. Batches are whole contexts (no mixing buffer: attention needs every
position of a context), and the LM's forward runs inside the compiled step: tokens in, SAE
update out, one program for every k of the sweep. The clean pass runs once per step for all
models; each model runs the blocks from its hookpoint's block on with its reconstruction
spliced in (BOS kept clean, as the spliced evaluation keeps it)."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import checks
from ksae_jax.data.feed import ArrayRows
from ksae_jax.lm import jax_lm

LOSSES = ("fvu", "kl", "fvu+kl")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a live run's SAEs minimise: their reconstruction (fvu), or, through the JAX LM,
    the KL of the spliced model's next-token distribution from the clean one."""

    loss: Literal["fvu", "kl", "fvu+kl"] = "fvu"
    """fvu (the family's reconstruction loss), kl (end-to-end: the spliced model's KL from
    the clean model), or fvu+kl (reconstruction + kl_coef * KL); kl needs the JAX LM and one
    hookpoint."""
    kl_coef: float = 1.0
    """Weight of the KL term in fvu+kl."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        checks.finite_nonneg("kl_coef", self.kl_coef)

    @property
    def end_to_end(self) -> bool:
        return self.loss != "fvu"


@dataclasses.dataclass(frozen=True)
class SplicedKL:
    """The static half of the end-to-end loss, a static argument of the step: the model's
    architecture, the hookpoint, and how the KL joins the reconstruction loss."""

    spec: jax_lm.Spec
    tap: str
    rec_coef: float  # 1 for fvu+kl, 0 for kl
    kl_coef: float

    @property
    def layer(self) -> int:
        return jax_lm.layer_of(self.tap)

    def prepare(self, batch: dict) -> dict:
        """The clean pass over batch["tokens"] (B, T), once for every model: the hookpoint's
        rows as "x" (1, B * (T - 1), d), the clean log-probabilities and the block's input."""
        weights = jax.lax.stop_gradient(batch["lm"])
        clean, acts, block_in = jax_lm.clean_pass(self.spec, weights, batch["tokens"], self.tap)
        x = acts[:, 1:].reshape(1, -1, acts.shape[-1]).astype(
            jnp.promote_types(acts.dtype, jnp.float32))
        return {**batch, "x": x, "clean": clean, "block_in": block_in}

    def kl(self, recon, batch: dict):
        """KL(clean || spliced), nats per predicted token, with recon (B * (T - 1), d) in
        place of the hookpoint's activations at positions 1..T-1."""
        tokens = batch["tokens"]
        new = recon.reshape(tokens.shape[0], -1, recon.shape[-1])
        spliced = jax_lm.spliced_pass(self.spec, jax.lax.stop_gradient(batch["lm"]), tokens,
                                      self.tap, batch["block_in"], new)
        clean = batch["clean"]
        return (jnp.exp(clean) * (clean - spliced)).sum(-1).mean()

    def loss(self, rec, recon, batch: dict):
        return self.rec_coef * rec + self.kl_coef * self.kl(recon, batch)


def spliced_kl(objective: Objective, backend) -> SplicedKL:
    """The step's static part for a live run with this objective on a JAX backend."""
    (hookpoint,) = backend.hookpoints
    rec = 1.0 if objective.loss == "fvu+kl" else 0.0
    kl = objective.kl_coef if objective.loss == "fvu+kl" else 1.0
    return SplicedKL(backend.lm.spec, hookpoint.path, rec, kl)


class ContextStream:
    """The end-to-end runs' batches: {"tokens": (B, T) contexts, "w", "lm": the weights},
    B * (T - 1) = batch_size rows, the contexts in the training text's seeded order (whole
    contexts, no mixing buffer). Its position follows from the step, so a run resumes bit
    for bit with nothing of its own in the checkpoint."""

    mode = "live"
    steps_per_cycle = 1

    def __init__(self, lm, batch_size: int, seed: int, objective: SplicedKL):
        per = lm.cfg.context - 1
        if batch_size % per:
            raise ValueError(f"--batch-size {batch_size} is not a whole number of contexts "
                             f"of {per} predictions (--context {lm.cfg.context})")
        self.lm, self.batch_size, self.seed = lm, batch_size, seed
        self.contexts, self.n, self.objective = batch_size // per, lm.cfg.tokens, objective
        self.d = lm.widths[lm.names[0]]

    def buffer_bytes(self) -> int:
        return 0

    def saved(self) -> dict:
        return {}

    def abstract(self) -> dict:
        return {}

    def restore(self, saved: dict) -> None:
        pass

    def abstract_batch(self) -> dict:
        weights = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                               self.lm.backend.lm.weights)
        return {"tokens": jax.ShapeDtypeStruct((self.contexts, self.lm.cfg.context), jnp.int32),
                "w": jax.ShapeDtypeStruct((self.batch_size,), jnp.float32), "lm": weights}

    def init_rows(self, h: int) -> ArrayRows:
        """The first steps' rows (what the models initialise from)."""
        ids = np.stack(list(itertools.islice(self.lm.train_contexts(self.seed),
                                             max(self.contexts, 64))))
        return ArrayRows(np.asarray(self.lm.forward(ids)[h]))

    def batches(self, start_step: int = 0) -> Iterator[dict]:
        contexts = self.lm.train_contexts(self.seed, start_step * self.contexts)
        w = jnp.ones(self.batch_size, jnp.float32)
        weights = self.lm.backend.lm.weights
        while True:
            ids = np.stack(list(itertools.islice(contexts, self.contexts)))
            yield {"tokens": jnp.asarray(ids), "w": w, "lm": weights}

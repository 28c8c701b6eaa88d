"""The model families: one forward per family, called by training, evaluation and inference
alike; each against a NumPy reference; no code outside the families asks which kind a model
is; and a new family takes one file (a toy one, registered and trained here)."""
import ast
import dataclasses
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ksae_jax
from ksae_jax import models, sae_config, sae_run, step, train
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.data import synthetic
from ksae_jax.data.feed import ArrayRows
from ksae_jax.evaluate import EvalSet, evaluate
from ksae_jax.models import registry
from ksae_jax.models.vector import SaeModel, VectorFamily, VectorSAE, VectorSAEModule
from ksae_jax.topk import k_sparse

ROOT = Path(__file__).resolve().parents[1]


def _cases():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    vectors = synthetic.generate(600, d=16, n_features=24, mean_active=3, seed=0).x
    # one case per family: conv and mlp are both ImageFamily (the mlp compiles faster)
    yield "mlp", SweepConfig(model=ImageModel("mlp", hidden=32), ks=(3,), steps=2,
                             batch_size=30), images, ArrayRows(images, 1 / 255)
    sae = sae_config(16, (3,), latents=48, steps=2, batch_size=100, multi_topk=True)
    yield "topk", sae, vectors, models.family(sae.model).rows(vectors, "x")


@pytest.mark.parametrize("name,cfg,x,rows", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_training_evaluation_and_inference_call_the_one_forward(name, cfg, x, rows, monkeypatch):
    family = models.family(cfg.model)

    def outcomes():
        r = train.train_sweep(cfg, x, progress=False)
        ev = evaluate(cfg, jax.tree.map(np.asarray, r.params), EvalSet(rows))
        recon = r.models().reconstruct(x[:5], cfg.ks[0])
        return r.params, ev.mse, recon

    before = outcomes()
    real = type(family).forward

    def changed(self, params, x, *args, **kw):  # the family's forward, on shifted inputs
        return real(self, params, x + 0.25, *args, **kw)

    monkeypatch.setattr(type(family), "forward", changed)
    jax.clear_caches()  # the jitted steps traced the old forward
    try:
        after = outcomes()
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    trained_differently = any(not np.array_equal(a, b) for a, b in
                              zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0])))
    assert trained_differently, f"{name}: training did not call the family's forward"
    assert not np.allclose(before[1], after[1]), f"{name}: evaluation did not call it"
    assert not np.allclose(before[2], after[2]), f"{name}: inference did not call it"


# where naming a family is the point: the families' own files, the readers of earlier
# versions' files (which families existed then), and the ecosystem's formats (each holds some)
KIND_MAY_BE_NAMED = ("ksae_jax/models/", "ksae_jax/formats.py", "ksae_jax/interop.py",
                     "ksae_jax/export.py")
FAMILY_NAMES = {cls.__name__ for r in registry.FAMILIES.values() for cls in r} | {
    "SaeModel", "VectorSAE", "VectorFamily"}


def _asks_the_kind(tree: ast.AST) -> list[int]:
    """Lines that branch on a model's kind: a comparison, boolean expression, conditional or
    match that reads an `arch`, or an isinstance / issubclass against a family's class."""
    def reads_arch(node):
        return any(isinstance(n, ast.Attribute) and n.attr == "arch" or
                   isinstance(n, ast.Name) and n.id == "arch" or
                   isinstance(n, ast.Constant) and n.value == "arch" for n in ast.walk(node))

    hits = []
    for node in ast.walk(tree):
        tests = {ast.Compare: lambda n: [n], ast.BoolOp: lambda n: [n], ast.IfExp: lambda n: [n.test],
                 ast.If: lambda n: [n.test], ast.Match: lambda n: [n.subject]}.get(type(node))
        if tests and any(reads_arch(t) for t in tests(node)):
            hits.append(node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
                and {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & FAMILY_NAMES):
            hits.append(node.lineno)
    return sorted(set(hits))


def test_no_code_outside_the_families_asks_which_kind_a_model_is():
    hits = []
    for folder in ("ksae_jax", "experiments", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(KIND_MAY_BE_NAMED):
                hits += [f"{rel}:{line}" for line in _asks_the_kind(ast.parse(path.read_text()))]
    assert hits == []


@pytest.mark.parametrize("code", ["arch = args.arch or 'topk'", "if cfg.model.arch == 'conv': pass",
                                  "x = 1 if m.arch in ('a',) else 2",
                                  "ok = isinstance(cfg.model, SaeModel)",
                                  "match d.get('arch'):\n    case 'topk': pass"])
def test_the_kind_check_sees_every_way_of_asking(code):
    assert _asks_the_kind(ast.parse(code)) == [1]


# ---------------------------------------------------------------- the SAE families vs NumPy

def _setup(arch, **fields):
    rng = np.random.default_rng(3)
    d, n, b = 6, 10, 8
    mc = registry.lookup(arch).config(d, n, **fields)
    family = models.family(mc)
    p = jax.tree.map(np.asarray, family.init(jax.random.key(1)))
    p = {**p, "b_enc": rng.standard_normal(n).astype(np.float32) * 0.3,
         "b_dec": rng.standard_normal(d).astype(np.float32) * 0.2}
    x = (rng.standard_normal((b, d)) * 2).astype(np.float32)
    w = np.ones(b, np.float32)
    w[-2:] = 0  # two padding rows
    return family, p, x, w


def _np_dense_grads(p, x, w, keep, widths, code_grad_extra=None):
    """FVU summed over the reconstructions from the first m latents (m in widths), and its
    gradient in float64, for dense codes ReLU(pre) on the kept entries (a constant mask)."""
    P = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x, w = x.astype(np.float64), w.astype(np.float64)
    pre = (x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    code = np.where(keep, np.maximum(pre, 0), 0)
    real = x[w > 0]
    denom = ((real - real.mean(0)) ** 2).sum()
    loss, g = 0.0, {k: np.zeros_like(v) for k, v in P.items()}
    g_code = np.zeros_like(code)
    for m in widths:
        r = code[:, :m] @ P["W_dec"][:m] + P["b_dec"] - x
        loss += (w[:, None] * r ** 2).sum() / denom
        gr = 2 * w[:, None] * r / denom
        g["W_dec"][:m] += code[:, :m].T @ gr
        g["b_dec"] += gr.sum(0)
        g_code[:, :m] += gr @ P["W_dec"][:m].T
    g_pre = g_code * (keep & (pre > 0))
    g["W_enc"] = g_pre.T @ (x - P["b_dec"])
    g["b_enc"] = g_pre.sum(0)
    g["b_dec"] -= g_pre.sum(0) @ P["W_enc"]
    return loss, g, code, pre


def _jax_loss_and_grads(family, p, x, w, hp):
    cfg = SweepConfig(model=family.model, ks=(hp["k"],) if "l0_coef" not in hp else None,
                      l0_coefs=(hp["l0_coef"],) if "l0_coef" in hp else None, steps=1)
    fn = lambda q: step.loss_fn(q, {"x": x, "w": w}, hp, None, cfg=cfg,
                                max_k=None if "l0_coef" in hp else 1)
    (loss, (_, out)), g = jax.value_and_grad(fn, has_aux=True)(jax.tree.map(np.asarray, p))
    return float(loss), jax.tree.map(np.asarray, g), out


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batch_topk_families_match_numpy_forward_and_gradient(arch):
    family, p, x, w = _setup(arch, **({"prefixes": (3, 6)} if arch == "matryoshka" else {}))
    k = 3
    P = {n: np.asarray(v, np.float64) for n, v in p.items()}
    acts = np.maximum((x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"], 0)
    flat = np.where(w[:, None] > 0, acts, -1).ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:int(w.sum()) * k]] = True  # the batch's top 6 x 3
    keep = keep.reshape(acts.shape) & (acts > 0)
    widths = family.model.prefixes + (family.model.latents,) if arch == "matryoshka" else \
        (family.model.latents,)
    want_loss, want_grad, want_code, _ = _np_dense_grads(p, x, w, keep, widths)
    out = family.forward(jax.tree.map(np.asarray, p), x, w, {"k": k}, 1)
    np.testing.assert_allclose(out.code, want_code, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(np.asarray(out.code)[w > 0]) == keep.sum() and \
        np.count_nonzero(np.asarray(out.code).sum(1) > 0) > 1  # rows keep different counts
    loss, grads, out = _jax_loss_and_grads(family, p, x, w, {"k": k})
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(grads[name], want_grad[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(out.min_kept) == pytest.approx(acts[keep].min(), rel=1e-6)
    # served as a JumpReLU with the one trained threshold
    served = family.forward({**jax.tree.map(np.asarray, p), "threshold": np.float32(0.5)}, x, w,
                            {"k": k}, 1, terms=False)
    np.testing.assert_allclose(served.code, np.where(acts > 0.5, acts, 0), rtol=1e-5, atol=1e-6)


def test_kth_largest_is_exact():
    from ksae_jax.models.batchtopk import kth_largest
    v = np.random.default_rng(0).random((50, 40)).astype(np.float32)
    v[3, :5] = 0.0
    for count in (1, 7, 300, 2000):
        assert float(kth_largest(jnp.asarray(v), count)) == np.sort(v.ravel())[::-1][count - 1]


def test_jumprelu_matches_numpy_forward_and_straight_through_gradient():
    family, p, x, w = _setup("jumprelu", bandwidth=0.5)
    n, lam, eps = family.model.latents, 0.05, 0.5
    P = {k: np.asarray(v, np.float64) for k, v in p.items()}
    pre = (x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    theta = np.maximum(np.quantile(pre, 0.6, axis=0), 0.05)  # inside the data: the kernel sees entries
    p = {**p, "log_threshold": np.log(theta).astype(np.float32)}
    P["log_threshold"] = np.log(theta)
    keep = pre > theta
    fvu, g, code, _ = _np_dense_grads({k: v for k, v in p.items() if k != "log_threshold"},
                                      x, w, keep, (n,))
    kernel = (np.abs((pre - theta) / eps) < 0.5).astype(np.float64)
    real = w / w.sum()
    g_code = _np_code_grad(P, x, w, code)
    g_theta = (g_code * -(theta / eps) * kernel).sum(0) + lam * (real[:, None] * -kernel / eps).sum(0)
    l0 = (real[:, None] * keep).sum()
    loss, grads, _ = _jax_loss_and_grads(family, p, x, w, {"l0_coef": lam})
    out = family.forward(jax.tree.map(np.asarray, p), x, w, {}, None, terms=False)
    np.testing.assert_allclose(out.code, np.where(keep, pre, 0), rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(fvu + lam * l0, rel=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(grads[name], g[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(grads["log_threshold"], g_theta * theta, rtol=1e-4, atol=1e-6)
    assert np.abs(g_theta).sum() > 0  # the pseudo-gradient is there


def _np_code_grad(P, x, w, code):
    x, w = x.astype(np.float64), w.astype(np.float64)
    real = x[w > 0]
    denom = ((real - real.mean(0)) ** 2).sum()
    r = code @ P["W_dec"] + P["b_dec"] - x
    return (2 * w[:, None] * r / denom) @ P["W_dec"].T


@pytest.mark.parametrize("model", [ImageModel("conv", hidden=16), ImageModel("mlp", hidden=32),
                                   sae_config(16, (3,), latents=48).model],
                         ids=lambda m: m.arch)
def test_bfloat16_forward_is_float32_within_bf16_rounding(model):
    import dataclasses
    rng = np.random.default_rng(0)
    x = (jnp.asarray(rng.random((8, 28, 28), np.float32)) if model.arch in ("conv", "mlp")
         else jnp.asarray(rng.normal(size=(8, 16)).astype(np.float32)))
    w = jnp.ones(8)
    f32, bf16 = models.family(model), models.family(dataclasses.replace(model, dtype="bfloat16"))
    params = f32.init(jax.random.key(0))
    a = f32.forward(params, x, w, {"k": 3}, 3, terms=False).recon
    b = bf16.forward(params, x, w, {"k": 3}, 3, terms=False).recon
    assert b.dtype == jnp.float32 and not np.array_equal(a, b)  # bf16 did run
    assert float(jnp.max(jnp.abs(a - b))) < 0.03 * float(jnp.max(jnp.abs(a))) + 1e-3


# ---------------------------------------------------------------- a new family in one file

@dataclasses.dataclass(frozen=True)
class ToyModel(SaeModel):
    """A toy family: the k largest of ReLU(W_enc (x - b_dec) + b_enc), decoded densely."""

    arch: Literal["toy"] = "toy"
    """The family."""


class ToyOutput(NamedTuple):
    recon: jax.Array
    code: jax.Array
    pre: jax.Array
    fvu: jax.Array | None = None
    auxk: jax.Array | None = None


class ToySAE(VectorSAEModule):
    def __call__(self, x, w, hp, max_k, *, dead=None, terms=True):
        pre = self.dense_pre(x)
        code = k_sparse(jax.nn.relu(pre), hp["k"], max_k)
        if not terms:
            return ToyOutput(self.decode_dense(code), code, pre)
        recon, selecting, fvu, aux = self.dense_terms(x, w, pre, code, dead)
        return ToyOutput(recon, code, selecting, fvu, aux)


class ToyFamily(VectorFamily):
    def module(self, rngs):
        return ToySAE(self.model, rngs=rngs)


@pytest.fixture
def toy_family():
    registry.register("toy", ToyModel, ToyFamily, VectorSAE)
    yield
    registry.FAMILIES.pop("toy")


def test_a_new_family_takes_one_file_and_trains_through_the_public_api(toy_family, tmp_path):
    x = synthetic.generate(3000, d=16, n_features=24, mean_active=3, seed=1).x
    cfg = ksae_jax.sae_config(16, (3, 6), arch="toy", latents=48, steps=30, batch_size=200)
    result = ksae_jax.train_sweep(cfg, x[:2500], x[2500:], progress=False)
    assert (np.diff(result.history["eval_fvu"][1]) < 0).mean() > 0.5  # it learns
    assert result.final.fvu[1] < result.final.fvu[0] < 1  # and more latents help
    loaded = ksae_jax.load(result.save(tmp_path))
    assert type(loaded) is VectorSAE and loaded.config.model == cfg.model
    codes = loaded.encode(x[:20], k=6)
    assert ((codes > 0).sum(1) <= 6).all() and (codes > 0).any()
    np.testing.assert_allclose(loaded.decode(codes, 6), loaded.reconstruct(x[:20], k=6), atol=1e-6)
    run = sae_run.main(["--data", str(_npy(tmp_path, x)), "--arch", "toy", "--latents", "48",
                        "--ks", "3", "--steps", "4", "--batch-size", "200", "--no-progress",
                        "--out", str(tmp_path / "cli")])  # the command line knows it too
    assert run.cfg.model.arch == "toy"


def _npy(folder, x):
    np.save(folder / "x.npy", x)
    return folder / "x.npy"

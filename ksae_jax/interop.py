"""SAEs in the ecosystem's formats, both ways:

- EleutherAI sparsify: a folder with cfg.json (SparseCoderConfig's fields and d_in) and
  sae.safetensors (encoder.weight (n, d), encoder.bias, W_dec (n, d), b_dec, and W_skip
  (d, d) with skip_connection); TopK SAEs, and transcoders (transcode: true: the encoder
  reads the MLP's input as it is, the decoder writes its output).
- SAELens: a folder with cfg.json (architecture, d_in, d_sae, apply_b_dec_to_input,
  normalize_activations, k for topk) and sae_weights.safetensors (W_enc (d, n), b_enc,
  W_dec (n, d), b_dec, threshold (n,) for jumprelu); topk, jumprelu and standard (ReLU).

Reading gives the payload of a ksae_jax params file (one model), so `ksae_jax.load` serves
it and `ksae train --init` trains on from it; the arithmetic is folded, not
approximated (SAELens's apply_b_dec_to_input = False and rescale_acts_by_decoder_norm; a
JumpReLU's decoder norms, which ksae_jax keeps at 1, go into its encoder and thresholds).
Writing maps every ksae_jax SAE family onto SAELens: TopK onto topk, BatchTopK, Matryoshka
and JumpReLU onto jumprelu (BatchTopK's one threshold repeated per latent), with the input
scale folded into the weights as sparsify's export does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ksae_jax.config import JumpReLUModel, SweepConfig, TopKModel
from ksae_jax.models.transcoder import TranscoderModel
from ksae_jax.files import write_bytes, write_json
from ksae_jax.safe_pickle import ParamsFileError

CFG = "cfg.json"
SPARSIFY_WEIGHTS, SAELENS_WEIGHTS = "sae.safetensors", "sae_weights.safetensors"
MIN_THRESHOLD = 1e-30  # a threshold of 0 (ReLU) as JumpReLU's log-threshold can hold it


def detect(path: Path) -> str | None:
    """"sparsify", "saelens" or None for a folder."""
    if (path / CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (path / CFG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    return None


def _read(path: Path, weights: str) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    try:
        cfg = json.loads((path / CFG).read_text())
        tensors = {k: np.asarray(v, np.float32) for k, v in load_file(str(path / weights)).items()}
    except Exception as e:  # noqa: BLE001 - malformed JSON or safetensors
        raise ParamsFileError(f"{path}: unreadable ({type(e).__name__}: {e})"[:300]) from None
    if not isinstance(cfg, dict):
        raise ParamsFileError(f"{path}: {CFG} is not a JSON object")
    return cfg, tensors


def _expect(path: Path, tensors: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        if name not in tensors:
            raise ParamsFileError(f"{path}: the weights have no {name!r}")
        if tensors[name].shape != shape:
            raise ParamsFileError(f"{path}: {name} has shape {tensors[name].shape}, but {CFG} "
                                  f"says {shape}")


def _payload(model, labels: dict, params: dict, source: str) -> dict:
    cfg = SweepConfig(model=model, steps=1, **labels)
    return {"config": cfg.to_dict(), "ks": list(cfg.ks), "input_scale": 1.0,
            "params": {k: v[None] for k, v in params.items()}, "metrics": {"imported_from": source}}


def read_sparsify(path: Path) -> dict:
    """The payload of a sparsify SparseCoder folder: a TopK SAE, or a transcoder (with its
    skip map where it has one); not groupmax, and no skip map on an SAE."""
    cfg, t = _read(path, SPARSIFY_WEIGHTS)
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    if cfg.get("activation", "topk") != "topk" or (skip and not transcode):
        raise ParamsFileError(f"{path}: sparsify's TopK SAEs and transcoders load (not groupmax, "
                              "nor an SAE with a skip connection)")
    try:
        d, n, k = int(cfg["d_in"]), int(cfg.get("num_latents") or 0), int(cfg["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise ParamsFileError(f"{path}: {CFG} lacks a usable {e}") from None
    n = n or d * int(cfg.get("expansion_factor", 32))
    _expect(path, t, {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,),
                      **({"W_skip": (d, d)} if skip else {})})
    params = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
              "b_dec": t["b_dec"], **({"W_skip": t["W_skip"]} if skip else {})}
    model = (TranscoderModel(d, n, arch="skip-transcoder" if skip else "transcoder",
                             transcoder_init="zero")  # sparsify's recipe: free decoder norms
             if transcode else TopKModel(d, n))
    return _payload(model, {"ks": (k,)}, params, f"sparsify:{path}")


TRANSCODERS = ("jumprelu_transcoder", "jumprelu_skip_transcoder")


def read_saelens(path: Path) -> dict:
    """The payload of a SAELens SAE folder (topk, jumprelu or standard), or of a jumprelu
    transcoder with one threshold for every latent (a BatchTopK transcoder's)."""
    cfg, t = _read(path, SAELENS_WEIGHTS)
    kind = cfg.get("architecture", "standard")
    if kind in TRANSCODERS:
        return read_saelens_transcoder(path, cfg, t)
    if kind not in ("topk", "jumprelu", "standard"):
        raise ParamsFileError(f"{path}: SAELens architecture {kind!r} is not read (topk, "
                              "jumprelu and standard are)")
    if cfg.get("normalize_activations", "none") != "none":
        raise ParamsFileError(f"{path}: normalize_activations={cfg['normalize_activations']!r}; "
                              "only 'none' is read (fold the scaling into the weights first)")
    try:
        d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise ParamsFileError(f"{path}: {CFG} lacks a usable {e}") from None
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    _expect(path, t, {**shapes, **({"threshold": (n,)} if kind == "jumprelu" else {})})
    W_enc, b_enc, W_dec = t["W_enc"].T, t["b_enc"], t["W_dec"]
    if not cfg.get("apply_b_dec_to_input", True):  # pre = x W_enc + b_enc = (x - b_dec) W_enc + ...
        b_enc = b_enc + t["b_dec"] @ t["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):  # topk of pre * |W_dec| , decoded by W_dec / |W_dec|
        norms = np.linalg.norm(W_dec, axis=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": t["b_dec"]}
    if kind == "topk":
        return _payload(TopKModel(d, n), {"ks": (int(cfg.get("k", 100)),)}, params,
                        f"saelens:{path}")
    threshold = t["threshold"] if kind == "jumprelu" else np.zeros(n, np.float32)
    if (threshold < 0).any() or not np.isfinite(threshold).all():
        raise ParamsFileError(f"{path}: threshold holds negative or non-finite values")
    # unit decoder rows, as ksae_jax trains them: z_i W_dec_i is unchanged when pre_i, b_enc_i
    # and theta_i are scaled by |W_dec_i| (exact for a JumpReLU, whose latents do not compete)
    norms = np.maximum(np.linalg.norm(params["W_dec"], axis=1), 1e-30)
    params = {**params, "W_enc": params["W_enc"] * norms[:, None], "b_enc": params["b_enc"] * norms,
              "W_dec": params["W_dec"] / norms[:, None]}
    threshold = threshold * norms
    params["log_threshold"] = np.log(np.maximum(threshold, MIN_THRESHOLD)).astype(np.float32)
    return _payload(JumpReLUModel(d, n), {"l0_coefs": (0.0,)}, params, f"saelens:{path}")


def read_saelens_transcoder(path: Path, cfg: dict, t: dict) -> dict:
    """A jumprelu transcoder whose latents share one threshold and whose metadata names its
    k (as ksae_jax writes a BatchTopK transcoder); others have no ksae_jax family."""
    try:
        d, n, d_out = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["d_out"])
        k = int(cfg.get("metadata", {})["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise ParamsFileError(f"{path}: {CFG} lacks a usable {e} (a transcoder's d_out, and its "
                              "k in metadata)") from None
    skip = cfg["architecture"] == "jumprelu_skip_transcoder"
    _expect(path, t, {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,),
                      "threshold": (n,), **({"W_skip": (d_out, d)} if skip else {})})
    if d_out != d or np.ptp(t["threshold"]) > 0:
        raise ParamsFileError(f"{path}: ksae_jax's transcoders map d to d and serve one threshold; "
                              "this one has d_out {d_out} or per-latent thresholds")
    params = {"W_enc": t["W_enc"].T, "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"],
              "threshold": np.float32(t["threshold"][0]), **({"W_skip": t["W_skip"]} if skip else {})}
    model = TranscoderModel(d, n, arch="skip-transcoder" if skip else "transcoder",
                            activation="batchtopk")
    return _payload(model, {"ks": (k,)}, params, f"saelens:{path}")


READERS = {"sparsify": read_sparsify, "saelens": read_saelens}


def saelens_tensors(params: dict, input_scale: float, threshold=None) -> dict:
    """One SAE's params in SAELens's names and layouts, the input scale s folded in (ours:
    pre = W_enc (s x - b_dec) + b_enc, x_hat = (W_dec^T z + b_dec) / s)."""
    s = np.float32(input_scale)
    out = {"W_enc": np.asarray(params["W_enc"]).T * s, "b_enc": np.asarray(params["b_enc"]),
           "W_dec": np.asarray(params["W_dec"]) / s, "b_dec": np.asarray(params["b_dec"]) / s,
           **({"W_skip": np.asarray(params["W_skip"])} if "W_skip" in params else {})}
    if threshold is not None:
        out["threshold"] = np.broadcast_to(np.asarray(threshold, np.float32),
                                           out["b_enc"].shape).copy()
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_saelens(out: Path, *, architecture: str, d_in: int, d_sae: int, tensors: dict,
                  k: int | None = None, metadata: dict | None = None, **fields) -> Path:
    """out/cfg.json and out/sae_weights.safetensors as SAELens's save_model writes them
    (fields: the architecture's own, e.g. a transcoder's d_out)."""
    from safetensors.numpy import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / SAELENS_WEIGHTS, save(tensors))
    cfg = {"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae),
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": metadata or {}}
    if k is not None:
        cfg.update(k=int(k), rescale_acts_by_decoder_norm=False)
    write_json(out / CFG, {**cfg, **fields})
    return out

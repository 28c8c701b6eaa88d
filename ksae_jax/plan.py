"""The compiler's plan for a sweep too large for this machine: the real training step lowered
and compiled from abstract shapes (jax.ShapeDtypeStruct with the mesh's shardings; nothing is
allocated), then read back: bytes of arguments, outputs and temporaries per device
(`compiled.memory_analysis()`), FLOPs (`cost_analysis()`), and every collective of the
partitioned HLO with the bytes it moves. Every device runs the same SPMD program, so the
figures are per device."""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ksae_jax import batching, sharding
from ksae_jax.config import SweepConfig
from ksae_jax.step import batch_specs, init_state, resolved, state_layout, sweep_step

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1,
          "u8": 1, "pred": 1, "s16": 2, "u16": 2, "u64": 8}
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[dict]:
    """{"op", "bytes"} of every collective in an HLO module's text (the -start of async
    pairs; bytes: the result's, every element of a tuple result counted)."""
    out = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m or "-done" in line.split("=")[1].split("(")[0]:
            continue
        nbytes = sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                     for dtype, dims in _SHAPE.findall(m.group(1)))
        out.append({"op": m.group(2), "bytes": int(nbytes)})
    return out


def _abstract(tree, mesh, specs):
    return jax.tree.map(lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                             sharding=NamedSharding(mesh, spec)),
                        tree, specs)


def plan(cfg: SweepConfig, mesh, n_rows: int = 10_000_000) -> dict:
    """Compiles one training step of cfg on `mesh` from abstract shapes; returns the plan
    (see the module docstring). The models share the program as on accelerators (vmap)."""
    cfg = dataclasses.replace(cfg, execution=dataclasses.replace(cfg.execution, batching="vmap"))
    run_cfg = resolved(cfg, n_rows)
    with sharding.use(mesh):
        state = state_layout(jax.eval_shape(lambda: init_state(cfg)), batching.resolve(cfg))
        state = _abstract(state, mesh, sharding.state_specs(state))
        n = cfg.n_models
        sums = jax.ShapeDtypeStruct((n, 3), jnp.float32,
                                    sharding=NamedSharding(mesh, sharding.leaf_spec((), 2)))
        b = cfg.batch_size
        sources = (cfg.n_sources,) if cfg.hookpoints else ()
        shapes = {"x": (*sources, b, *cfg.model.input_shape), "w": (b,)}
        specs = batch_specs(shapes_only(shapes), cfg)
        batch = {name: jax.ShapeDtypeStruct(shape, jnp.float32,
                                            sharding=NamedSharding(mesh, specs[name]))
                 for name, shape in shapes.items()}
        ks = np.asarray(cfg.ks, np.int32) if cfg.ks else None
        compiled = sweep_step.lower(state, sums, batch, ks, np.int32(0), cfg=run_cfg).compile()
    return {"devices": int(np.prod(list(mesh.shape.values()))), "mesh": dict(mesh.shape),
            "per_device": figures(compiled), "config": cfg.to_dict()}


def shapes_only(shapes: dict) -> dict:
    return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}


def figures(compiled) -> dict:
    """Per-device bytes (arguments, outputs, temporaries), FLOPs and collectives of a
    compiled program."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
            "flops": float(cost.get("flops", 0.0)), "collectives": collectives(compiled.as_text())}


@dataclasses.dataclass(frozen=True)
class LMPlan:
    """A JAX language model feeding the SAEs live: its forward pass is planned beside the
    step, from its config.json alone (no weights are read)."""

    model: str | None = None
    """A Hugging Face folder (or a config.json) of a GPT-2 or Llama-family model."""
    lm_batch: int = 32
    """Contexts per forward pass."""
    context: int = 128
    """Tokens per context."""
    lm_dtype: str | None = None
    """The weights' dtype (None: the config's torch_dtype)."""


def lm_plan(lm: LMPlan, hookpoints, mesh) -> dict:
    """The forward pass that gives the hookpoints' rows, compiled on the mesh from abstract
    shapes: the weights replicated, the contexts split over the data axis."""
    from pathlib import Path

    from ksae_jax.lm import backend, jax_lm

    path = Path(lm.model).expanduser()
    config = jax_lm.read_config(path.parent if path.name == "config.json" else path)
    spec = jax_lm.spec_of(config)
    taps = tuple(tap for _, tap in jax_lm.resolve(spec, hookpoints or [f"resid_post.{spec.layers - 1}"]))
    replicated = NamedSharding(mesh, sharding.P())
    weights = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                           jax_lm.abstract_weights(config, lm.lm_dtype))
    with sharding.use(mesh):
        ids = jax.ShapeDtypeStruct((lm.lm_batch, lm.context), jnp.int32,
                                   sharding=NamedSharding(mesh, sharding.batch_spec(2)))
        compiled = backend._jax_rows.lower(spec, weights, ids, taps).compile()
    return {"model": lm.model, "spec": dataclasses.asdict(spec), "taps": list(taps),
            "lm_batch": lm.lm_batch, "context": lm.context,
            "weight_bytes": sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(weights)),
            "per_device": figures(compiled)}


def summary(p: dict) -> dict:
    """The plan's headline figures: GB per device (arguments, temporaries), TFLOP, and the
    bytes of each kind of collective."""
    d = p["per_device"]
    moved: dict[str, int] = {}
    for c in d["collectives"]:
        moved[c["op"]] = moved.get(c["op"], 0) + c["bytes"]
    return {"mesh": sharding.format_axes(p["mesh"]), "devices": p["devices"],
            "arguments_gb": d["argument_bytes"] / 1e9, "outputs_gb": d["output_bytes"] / 1e9,
            "temp_gb": d["temp_bytes"] / 1e9, "tflop": d["flops"] / 1e12,
            "collective_gb": {op: b / 1e9 for op, b in sorted(moved.items())}}


def run(cfg: SweepConfig, axes: dict[str, int], out=None,
        lm: LMPlan | None = None) -> dict | None:
    """`ksae plan`: the plan of cfg on a mesh of `axes` (and with lm.model, of the LM's
    forward pass that feeds it), printed (and written to out/plan.json). Called before JAX
    has started (as `ksae plan` is), it gives the CPU backend the mesh's devices."""
    try:
        jax.config.update("jax_num_cpu_devices", int(np.prod(list(axes.values()))))
    except RuntimeError:  # JAX has started: the mesh must fit the devices it has
        pass
    try:
        sharding.check_axes(axes, jax.device_count(), cfg, cfg.family.shards_latents)
    except ValueError as e:
        raise ValueError(f"--mesh: {e}") from None
    mesh = sharding.make_mesh(axes)
    p = plan(cfg, mesh)
    s = summary(p)
    print(f"plan: {cfg.model.arch} d = {cfg.model.d_in}, n = {cfg.model.latents:,}, "
          f"{cfg.label_name}s {list(cfg.labels)}, " + (f"hookpoints {list(cfg.hookpoints)}, "
                                                        if cfg.hookpoints else "")
          + f"batch {cfg.batch_size}, mesh {s['mesh']} ({s['devices']} devices)\n"
          + line("SAE step", s))
    if lm is not None and lm.model is not None:
        p["lm"] = lm_plan(lm, cfg.hookpoints, mesh)
        p["lm"]["summary"] = summary({**p, "per_device": p["lm"]["per_device"]})
        print(f"LM forward ({p['lm']['spec']['kind']}, {p['lm']['weight_bytes'] / 1e9:.2f} GB "
              f"of weights, replicated; {lm.lm_batch} contexts of {lm.context} tokens split "
              "over the data axis)\n" + line("LM forward", p["lm"]["summary"]))
    if out is not None:
        from ksae_jax.files import write_json
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "plan.json", {**p, "summary": s})
    return p


def line(label: str, s: dict) -> str:
    return (f"  {label}, per device: arguments {s['arguments_gb']:.2f} GB, outputs "
            f"{s['outputs_gb']:.2f} GB, temporaries {s['temp_gb']:.2f} GB, {s['tflop']:.2f} "
            "TFLOP; collectives " + (", ".join(f"{op} {gb:.3f} GB" for op, gb in
                                              s["collective_gb"].items()) or "none"))

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
from ksae_jax.step import init_state, resolved, state_layout, sweep_step

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
    cfg = dataclasses.replace(cfg, batching="vmap")
    run_cfg = resolved(cfg, n_rows)
    with sharding.use(mesh):
        state = state_layout(jax.eval_shape(lambda: init_state(cfg)), batching.resolve(cfg))
        state = _abstract(state, mesh, sharding.state_specs(state))
        n = cfg.n_models
        sums = jax.ShapeDtypeStruct((n, 3), jnp.float32,
                                    sharding=NamedSharding(mesh, sharding.leaf_spec((), 2)))
        b = cfg.batch_size
        batch = {"x": jax.ShapeDtypeStruct((b, *cfg.model.input_shape), jnp.float32,
                                           sharding=NamedSharding(mesh, sharding.batch_spec(2))),
                 "w": jax.ShapeDtypeStruct((b,), jnp.float32,
                                           sharding=NamedSharding(mesh, sharding.batch_spec(1)))}
        ks = np.asarray(cfg.ks or cfg.max_ks, np.int32)
        compiled = sweep_step.lower(state, sums, batch, ks, np.int32(0), cfg=run_cfg).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    found = collectives(compiled.as_text())
    return {"devices": int(np.prod(list(mesh.shape.values()))), "mesh": dict(mesh.shape),
            "per_device": {"argument_bytes": int(mem.argument_size_in_bytes),
                           "output_bytes": int(mem.output_size_in_bytes),
                           "temp_bytes": int(mem.temp_size_in_bytes),
                           "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
                           "flops": float(cost.get("flops", 0.0)), "collectives": found},
            "config": cfg.to_dict()}


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

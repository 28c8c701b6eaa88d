"""Scale out with JAX's own sharding. A device mesh with named axes:

- `data`: the batch is split across devices; the compiler averages the gradients;
- `model`: the models of a sweep (the leading axis of the state) are split across devices;
- `latent` (TopK SAEs): W_enc, b_enc, W_dec and the dead counters are split along the
  latents, and the top-k is taken per shard, then over the candidates (exact).

The train step stays the same pure function: the state and batches are placed with
NamedShardings, the step constrains its outputs to the same placement, and GSPMD partitions
the rest. Several hosts: `initialize` starts jax.distributed; each process then feeds its
own slice of every batch and only process 0 writes files.
"""
from __future__ import annotations

import contextlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model", "latent")
LATENT_LEAVES = ("W_enc", "b_enc", "W_dec", "log_threshold", "since_fired")  # latent axis: dim 1


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,model=4" -> {"data": 2, "model": 4}; ValueError naming what is wrong."""
    axes = {}
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or name not in AXES:
            raise ValueError(f"mesh axis {part.strip()!r}: expected NAME=SIZE with NAME one of {AXES}")
        if name in axes:
            raise ValueError(f"mesh axis {name!r} is given twice")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh axis {name}: size must be a positive integer, got {size!r}")
        axes[name] = int(size)
    return axes


def default_axes(n_devices: int, n_models: int) -> dict[str, int]:
    """Every device on `model` when the sweep has at least as many models as devices (and
    they divide evenly), else every device on `data`."""
    if n_models >= n_devices and n_models % n_devices == 0:
        return {"model": n_devices}
    return {"data": n_devices}


def check_axes(axes: dict[str, int], n_devices: int, cfg, shards_latents: bool) -> None:
    """Raises ValueError when the mesh does not fit the devices or the sweep (shards_latents:
    whether the sweep's family can be split along its latents)."""
    if math.prod(axes.values()) != n_devices:
        raise ValueError(f"mesh {format_axes(axes)} has {math.prod(axes.values())} devices; "
                         f"there are {n_devices}")
    if cfg.n_models % axes.get("model", 1):
        raise ValueError(f"model={axes['model']} does not divide the {cfg.n_models} models")
    if cfg.batch_size % axes.get("data", 1):
        raise ValueError(f"data={axes['data']} does not divide the batch size {cfg.batch_size}")
    if axes.get("latent", 1) > 1:
        if not shards_latents:
            raise ValueError(f"the latent axis splits SAEs on vectors, not {cfg.model.arch!r} models")
        if cfg.model.latents % axes["latent"]:
            raise ValueError(f"latent={axes['latent']} does not divide the {cfg.model.latents} latents")


def format_axes(axes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in axes.items())


def make_mesh(axes: dict[str, int]) -> jax.sharding.Mesh:
    names = tuple(a for a in AXES if a in axes)
    return jax.make_mesh(tuple(axes[a] for a in names), names,
                         axis_types=(AxisType.Auto,) * len(names))


@contextlib.contextmanager
def use(mesh: jax.sharding.Mesh | None):
    """The mesh as JAX's context mesh while a run traces and runs (None: no mesh)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh):
        yield


def axis_size(name: str) -> int:
    """Size of a mesh axis in the context mesh (1 when there is none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or name not in mesh.axis_names else mesh.shape[name]


def _axis(name: str):
    return name if axis_size(name) > 1 else None


# ---------------------------------------------------------------- placements

def leaf_spec(path, ndim: int) -> P:
    """The PartitionSpec of one leaf of the train state: a leading model axis unless the leaf
    is one model's (inside batching.Models), then the latent axis for latent-wide leaves."""
    per_model = any(isinstance(k, jax.tree_util.FlattenedIndexKey) for k in path)
    names = {str(getattr(k, "key", getattr(k, "name", ""))) for k in path}
    lead = () if per_model else (_axis("model"),)
    rest = [None] * (ndim - len(lead))
    if rest and names & set(LATENT_LEAVES):
        rest[0] = _axis("latent")
    return P(*lead, *rest)


def state_specs(state):
    return jax.tree_util.tree_map_with_path(lambda p, a: leaf_spec(p, np.ndim(a)), state)


def batch_spec(ndim: int) -> P:
    return P(_axis("data"), *([None] * (ndim - 1)))


def constrain(tree, specs):
    """with_sharding_constraint under a context mesh of more than one device; else tree."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.tree.map(lax.with_sharding_constraint, tree, specs)


def first_device() -> jax.sharding.SingleDeviceSharding:
    """Where a run without a mesh keeps its arrays (committed: see put)."""
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def put(array, spec: P, mesh) -> jax.Array:
    """A host array placed on the mesh (every process passes the whole array), or without
    one committed to the first device, as the train state is (state_shardings): a jitted
    step that sees the same placements at every call compiles once."""
    array = np.asarray(array)
    if mesh is None:
        return jax.device_put(array, first_device())
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def state_shardings(state, mesh):
    """NamedShardings of a train state's leaves on the mesh; without one, the first device
    (committed: the step's outputs are, so its inputs are alike from the first call on)."""
    if mesh is None:
        device = first_device()
        return jax.tree.map(lambda _: device, state)
    with use(mesh):
        specs = state_specs(state)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def global_rows(local: np.ndarray, mesh) -> jax.Array:
    """One array of rows from each process's `local` rows, split over every device of the
    mesh (so that reductions over the rows become collectives), or on the default device."""
    if mesh is None:
        return jnp.asarray(local)
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, P(tuple(mesh.axis_names))), np.ascontiguousarray(local))


def batch_putter(mesh, local: tuple[int, int] | None = None):
    """How a feeder puts a batch on the mesh: the whole batch, or (several processes) this
    process's rows [start, stop) of every global batch."""
    if mesh is None:
        return jax.device_put

    def put_batch(batch: dict) -> dict:
        with use(mesh):
            specs = {k: batch_spec(np.ndim(v)) for k, v in batch.items()}
        if local is None:
            return {k: put(v, specs[k], mesh) for k, v in batch.items()}
        return {k: jax.make_array_from_process_local_data(NamedSharding(mesh, specs[k]), v)
                for k, v in batch.items()}

    return put_batch


def to_host(tree):
    """numpy copies of (possibly sharded, possibly multi-process) arrays, on every process."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(a, "is_fully_addressable", True) for a in leaves):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# ---------------------------------------------------------------- exact top-k over latent shards

def latent_top_k(x: jax.Array, k: int, local_top_k, bias: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """top-k of x + bias along the last axis when that axis is split over the `latent` mesh
    axis: each shard's local top-k, then the top-k of the gathered candidates. Candidates come
    in shard order, each shard's in value-then-index order, so ties still go to the lower
    global index: the result equals lax.top_k on the whole array."""
    if bias is None:
        bias = jnp.zeros(x.shape[-1:], x.dtype)
    if axis_size("latent") == 1:
        return local_top_k(x, k, bias)
    lead = x.shape[:-1]

    def per_shard(xs, bs):
        vals, idx = local_top_k(xs, min(k, xs.shape[-1]), bs)
        offset = lax.axis_index("latent") * xs.shape[-1]
        vals = lax.all_gather(vals, "latent", axis=vals.ndim - 1, tiled=True)
        idx = lax.all_gather(idx + offset, "latent", axis=idx.ndim - 1, tiled=True)
        best, pos = lax.top_k(vals, k)
        return best, jnp.take_along_axis(idx, pos, axis=-1)

    spec = P(*([None] * len(lead)), "latent")
    out = P(*([None] * (len(lead) + 1)))
    return jax.shard_map(per_shard, in_specs=(spec, P("latent")), out_specs=(out, out),
                         axis_names={"latent"}, check_vma=False)(x, bias)


# ---------------------------------------------------------------- several hosts

def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """jax.distributed.initialize, with CPU collectives (gloo) for hosts without GPUs.
    Arguments left None come from the environment variables JAX reads (or the cluster)."""
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def is_writer() -> bool:
    """Whether this process writes files (process 0 of a multi-host run)."""
    return jax.process_index() == 0

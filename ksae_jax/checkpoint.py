"""Sharded, asynchronous, atomic checkpoints of the train state, with Orbax (the JAX
ecosystem's checkpointer): every process writes only its own shards, the training loop goes
on while they are written, a save is renamed into place only once complete (a save killed
halfway is never taken for a whole one), the last `keep` are kept, and a restore reshards
onto any mesh and any number of processes. Beside the arrays, JSON holds the config, the
step, the history and the wall time.

    DIR/checkpoints/<step>/state/...    the train state (params, Adam, counters), sharded
    DIR/checkpoints/<step>/meta/...     JSON: format, config, step, history, seconds

Checkpoints of earlier versions (DIR/checkpoint.pkl, host arrays) still resume: see
`read_legacy`.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import jax
import numpy as np

from ksae_jax.formats import load_checkpoint
from ksae_jax.safe_pickle import ParamsFileError

FOLDER, LEGACY = "checkpoints", "checkpoint.pkl"
FORMAT, VERSION = "ksae_jax.orbax_checkpoint", 1
KEEP = 2  # checkpoints kept unless a run says otherwise


class Checkpoints:
    """The checkpoints of one run folder (an Orbax CheckpointManager)."""

    def __init__(self, folder: str | Path, keep: int = KEEP, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.ocp, self.folder = ocp, Path(folder).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        with _quiet():
            self.manager = ocp.CheckpointManager(self.folder, options=options)

    def latest(self) -> int | None:
        """The last complete checkpoint's step (a save cut short is not one)."""
        with _quiet():
            return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, stream=None) -> None:
        """Starts writing `state` (jax arrays, any sharding) and `meta` (JSON) at `step`, and
        a live source's `stream` state (arrays) when given; returns once the arrays have been
        copied off the devices, before they are written."""
        args = self.ocp.args
        items = {"state": args.StandardSave(state),
                 "meta": args.JsonSave({"format": FORMAT, "version": VERSION, **meta})}
        if stream:
            items["stream"] = args.StandardSave(stream)
        self.manager.save(step, args=args.Composite(**items))

    def restore(self, like, step: int | None = None, stream_like=None) -> tuple:
        """(state, meta) of `step` (default: the latest), each array placed as the matching
        leaf of `like` says (a jax.ShapeDtypeStruct with a sharding): any mesh, any process
        count; with stream_like, (state, meta, stream)."""
        step = self.latest() if step is None else step
        if step is None:
            raise ParamsFileError(f"{self.folder}: no complete checkpoint to resume from")
        args = self.ocp.args
        items = {"state": args.StandardRestore(like), "meta": args.JsonRestore()}
        if stream_like:
            items["stream"] = args.StandardRestore(stream_like)
        try:
            with _quiet():
                got = self.manager.restore(step, args=args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - whatever a damaged checkpoint makes Orbax raise
            raise ParamsFileError(f"{self.folder}/{step}: unreadable checkpoint "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        meta = got.meta
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ParamsFileError(f"{self.folder}/{step}: not a ksae_jax checkpoint of version "
                                  f"{VERSION}")
        if stream_like is None:
            return got.state, meta
        return got.state, meta, (got.stream if stream_like else {})

    def meta(self, step: int | None = None) -> dict:
        """The JSON of a checkpoint (default: the latest): config, step, history, seconds."""
        step = self.latest() if step is None else step
        args = self.ocp.args
        try:
            with _quiet():
                meta = self.manager.restore(step, args=args.Composite(meta=args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - whatever a damaged checkpoint makes Orbax raise
            raise ParamsFileError(f"{self.folder}/{step}: unreadable checkpoint "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not isinstance(meta, dict) or "config" not in meta:
            raise ParamsFileError(f"{self.folder}/{step}: not a ksae_jax checkpoint")
        return meta

    def wait(self) -> None:
        """Until every save started has been written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


@contextlib.contextmanager
def _quiet():
    """Orbax's own log lines silenced: a damaged checkpoint is reported in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_legacy(path: Path, like) -> tuple:
    """(state, meta) of a checkpoint.pkl of ksae_jax 0.2 (host arrays in leaf order), placed
    as `like` says."""
    ckpt = load_checkpoint(path)
    leaves, treedef = jax.tree.flatten(like)
    saved = ckpt["state"]
    if len(saved) != len(leaves) or any(a.shape != s.shape for a, s in zip(saved, leaves)):
        raise ParamsFileError(f"{path}: its arrays do not match the configured models")
    placed = [jax.device_put(a.astype(s.dtype), s.sharding) if s.sharding is not None
              else jax.numpy.asarray(a, s.dtype) for a, s in zip(saved, leaves)]
    meta = {k: ckpt[k] for k in ("config", "step", "history", "seconds")}
    return jax.tree.unflatten(treedef, placed), meta


SHARDED_PARAMS, SHARD_EXPORTS = "params_sharded", "params_shards"


def save_sharded_params(folder: Path, params, meta: dict) -> Path:
    """Params too large for one host, written without gathering them: folder/params_sharded
    (Orbax: every process its own shards; restores onto any mesh) and, per process,
    folder/params_shards/process<i>.safetensors holding the shards this process owns (one
    copy of each: replica 0), named "<leaf>@<start>:<stop>,..." by their place in the whole
    array, with process<i>.json giving every leaf's whole shape."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import save

    from ksae_jax.files import write_bytes, write_json

    folder = Path(folder).absolute()
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(folder / SHARDED_PARAMS, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)), force=True)
    tensors, shapes = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        shapes[name] = list(leaf.shape)
        for shard in leaf.addressable_shards:
            if shard.replica_id == 0:
                where = ",".join(f"{s.start or 0}:{s.stop if s.stop is not None else n}"
                                 for s, n in zip(shard.index, leaf.shape))
                tensors[f"{name}@{where}"] = np.asarray(shard.data)
    shards = folder / SHARD_EXPORTS
    shards.mkdir(parents=True, exist_ok=True)
    write_bytes(shards / f"process{jax.process_index()}.safetensors", save(tensors))
    write_json(shards / f"process{jax.process_index()}.json", {"shapes": shapes, **meta})
    return folder / SHARDED_PARAMS

"""One process of a multi-process run that measures its own peak memory while a sharded train
state is born and checkpointed (run by tests/test_sharding.py, two processes x 4 CPU devices).

    python tests/rss_check.py PORT PROCESS_ID OUT_DIR

The state (a TopK SAE of d = 512, n = 163,840: about 2 GB with Adam's moments) is split over
the 8 devices of both processes along the latents, so each process holds about 1 GB. Prints
JSON: the process's share of the state, its resident memory before the state exists (the
fixed overhead: Python, JAX, the data), and the peaks while the state is initialised and while
a checkpoint is written, each measured from a reset high-water mark (/proc/self/clear_refs).
"""
import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

D, N = 512, int(os.environ.get("KSAE_RSS_LATENTS", 163_840))


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def main(port: str, pid: str, out: str) -> None:
    from ksae_jax import sae_config, sharding, step
    from ksae_jax.checkpoint import Checkpoints
    from ksae_jax.data.vectors import open_vectors

    sharding.initialize(f"localhost:{port}", 2, int(pid))
    import jax

    mesh = sharding.make_mesh({"latent": 8})
    rows = open_vectors(np.random.default_rng(0).standard_normal((40_000, D)).astype(np.float32))
    cfg = sae_config(D, (32,), latents=N, steps=1, batch_size=256)
    before = rss_kb("VmRSS")
    reset_peak()
    state = step.init_state(cfg, rows, mesh=mesh)
    jax.block_until_ready(state)
    init_peak = rss_kb("VmHWM")
    share = sum(s.data.nbytes for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards)
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    reset_peak()
    ckpts = Checkpoints(Path(out) / "checkpoints")
    ckpts.save(1, state, {"step": 1})
    ckpts.wait()
    ckpt_peak = rss_kb("VmHWM")
    print(json.dumps({"process": int(pid), "state_bytes": total, "share_bytes": share,
                      "rss_before_kb": before, "init_peak_kb": init_peak,
                      "checkpoint_peak_kb": ckpt_peak}))


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Helpers the test modules share (tests/ is on sys.path: import helpers)."""

def latest_checkpoint(folder):
    """(step, meta) of a run folder's latest complete checkpoint (None, None if there is none)."""
    from pathlib import Path

    from ksae_jax.checkpoint import FOLDER, Checkpoints

    ckpts = Checkpoints(Path(folder) / FOLDER)
    step = ckpts.latest()
    return (None, None) if step is None else (step, ckpts.meta(step))

"""A run that dies (os._exit, as if killed) right after its first checkpoint is complete, so
that tests can resume it elsewhere.

    python tests/stopped_run.py ksae_jax train FLAGS...
"""
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ksae_jax.checkpoint import Checkpoints

real_save = Checkpoints.save


def save_then_die(self, *args, **kw):
    real_save(self, *args, **kw)
    self.wait()  # every process's shards are written and the save is committed
    os._exit(75)


Checkpoints.save = save_then_die
module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
runpy.run_module(module, run_name="__main__")

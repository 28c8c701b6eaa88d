"""experiments.ksweep with injected slowness, so that tests can kill it at a chosen moment.

KSAE_TEST_STEP_DELAY=s       sleep s seconds before every training step
KSAE_TEST_SLOW_WRITE=s       from the 2nd checkpoint on, stall s seconds halfway through
                             writing it (the temporary file is half written meanwhile)
"""
import os
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ksae_jax import cli, files, formats, train  # noqa: E402

step_delay = float(os.environ.get("KSAE_TEST_STEP_DELAY", "0"))
write_delay = float(os.environ.get("KSAE_TEST_SLOW_WRITE", "0"))

if step_delay:
    fast_step = train.sweep_step

    def slow_step(*args, **kwargs):
        time.sleep(step_delay)
        return fast_step(*args, **kwargs)

    train.sweep_step = slow_step

if write_delay:
    fast_write, n_checkpoints = formats.write_pickle, [0]

    def slow_write(path, obj):
        if Path(path).name != cli.CHECKPOINT:
            return fast_write(path, obj)
        n_checkpoints[0] += 1
        if n_checkpoints[0] < 2:
            return fast_write(path, obj)
        data = pickle.dumps(obj, protocol=4)

        def write(f):
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(write_delay)
            f.write(data[len(data) // 2:])

        return files.atomic_write(path, write)

    formats.write_pickle = slow_write

from experiments import ksweep  # noqa: E402

cli.run(ksweep.main)

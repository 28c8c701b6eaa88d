"""The image k sweep (python -m experiments.ksweep) with injected slowness, so that tests can kill it at a chosen moment.

KSAE_TEST_STEP_DELAY=s       sleep s seconds before every training step
KSAE_TEST_SLOW_WRITE=s       from the 2nd checkpoint's step on, stall s seconds before the rename
                             that completes it (its temporary folder is written meanwhile)
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ksae_jax import cli, image_run, train

step_delay = float(os.environ.get("KSAE_TEST_STEP_DELAY", "0"))
write_delay = float(os.environ.get("KSAE_TEST_SLOW_WRITE", "0"))

if step_delay:
    fast_step = train.sweep_step

    def slow_step(*args, **kwargs):
        time.sleep(step_delay)
        return fast_step(*args, **kwargs)

    train.sweep_step = slow_step

if write_delay:  # hold back the atomic rename that completes an (asynchronous) Orbax save
    from orbax.checkpoint._src.path import atomicity

    real_finalize, steps = atomicity.AtomicRenameTemporaryPath.finalize, []

    async def slow_finalize(self):
        # the checkpoint's step: checkpoints/STEP[.tmp]/... (finalize also runs per item)
        parts = Path(str(self.get_final())).parts
        step = parts[parts.index("checkpoints") + 1].split(".")[0]
        if step not in steps:
            steps.append(step)
        if step != steps[0]:
            time.sleep(write_delay)  # the save's files are written, not yet renamed into place
        return await real_finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize

cli.run(lambda: image_run.main(sys.argv[1:]), "ksweep")

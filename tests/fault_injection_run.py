"""`python -m ocl_jax.main` with a fault injected: SIGKILL in the middle of saving one step.

OCL_KILL_DURING_SAVE=<step> (or `first`: whichever step this process saves first)
kills the process after that step's checkpoint files are written but before
Orbax's atomic rename commits them, the worst moment for a crash. Used by
tests/test_reliability.py only.
"""

import os
import signal
import sys

from absl import app
from orbax.checkpoint._src.path import atomicity

from ocl_jax import main

_step = os.environ.get("OCL_KILL_DURING_SAVE")
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _finalize_or_die(self, *args, **kwargs):
  name = self.get_final().name
  if _step is not None and name.isdigit() and _step in (name, "first"):
    sys.stderr.write(f"FAULT: killed while saving step {name}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
  return await _finalize(self, *args, **kwargs)


atomicity.AtomicRenameTemporaryPath.finalize = _finalize_or_die

if __name__ == "__main__":
  app.run(main.main)

"""Run a module as on a plain JAX install: `python tests/without_tensorflow.py -m MODULE ARGS`.

TensorFlow, TensorFlow Datasets and clu are absent (as on an accelerator image that has only
JAX, flax, optax and orbax): importing them raises ModuleNotFoundError and
importlib.util.find_spec finds nothing, as when they are not installed.
"""

import runpy
import sys

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")


def block() -> None:
  """Make the BLOCKED packages unimportable in this interpreter (None in sys.modules)."""
  for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
      del sys.modules[name]
  for name in BLOCKED:
    sys.modules[name] = None


if __name__ == "__main__":
  block()
  if len(sys.argv) < 3 or sys.argv[1] != "-m":
    raise SystemExit(__doc__)
  module = sys.argv[2]
  sys.argv = [module] + sys.argv[3:]
  runpy.run_module(module, run_name="__main__", alter_sys=True)

"""Golden losses: the first steps' losses of every method x augmentation, kept as exact floats.

`python -m tests.golden_losses` (from the repository root) records them, with the machine they
were computed on, into tests/data/golden_losses.json; tests/test_golden_losses.py checks the
current code against them. XLA's CPU code (and with it the last bits of a loss) depends on the
CPU model and the jax version, so the check is exact on the recording machine and to 1e-4
elsewhere. Record them again only when a change is meant to alter the arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform

import tests.conftest  # noqa: F401  the suite's device count and flags, before jax starts

import jax  # noqa: E402

from tests import test_device_invariance as invariance  # noqa: E402

PATH = pathlib.Path(__file__).parent / "data" / "golden_losses.json"


def machine() -> str:
  """What the last bits of a CPU loss depend on: the CPU model and features, jax / jaxlib."""
  model, flags = platform.processor(), ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name") and model == platform.processor():
        model = line.split(":", 1)[1].strip()
      if line.startswith("flags") and not flags:
        flags = hashlib.sha256(" ".join(sorted(line.split(":", 1)[1].split())).encode())
        flags = flags.hexdigest()[:12]
  except OSError:
    pass
  import jaxlib

  return f"{model} (flags {flags}) | jax {jax.__version__} | jaxlib {jaxlib.__version__}"


def cases() -> list[tuple[str, str]]:
  return [(p.values[0], p.values[1]) for p in invariance.cases()]


def losses(method: str, augmentation: str) -> list[float]:
  """The losses of the first steps on one device (the device-invariance test's batches)."""
  _, values, _ = invariance.run_steps(invariance.case_config(method, augmentation), 1)
  return values


def main() -> None:
  record = {
      "machine": machine(),
      "steps": invariance.STEPS,
      "losses": {f"{m}-{a}": losses(m, a) for m, a in cases()},
  }
  PATH.write_text(json.dumps(record, indent=1) + "\n")
  print(f"wrote {PATH}: {len(record['losses'])} cases on {record['machine']}")


if __name__ == "__main__":
  main()

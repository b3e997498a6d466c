"""The first steps' losses of every method x augmentation against recorded values.

The values (tests/data/golden_losses.json, written by `python -m tests.golden_losses`) were
recorded before the train step was rewritten around the method registry and the view
composition; a refactor must reproduce them. On the recording machine (same CPU model and
jax / jaxlib versions) they must match bit for bit; elsewhere XLA's CPU code rounds
differently and they must match to 1e-4. The default suite checks three cases that together
use every method, augmentation and hook; `-m slow` checks them all.
"""

import json

import numpy as np
import pytest

from tests import golden_losses

RECORD = json.loads(golden_losses.PATH.read_text())
IN_DEFAULT_SUITE = {"moco-bgmix+mixup", "byol-sgcl_local", "simclr-oacrop"}


def test_every_case_is_recorded():
  assert sorted(RECORD["losses"]) == sorted(f"{m}-{a}" for m, a in golden_losses.cases())


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c, marks=() if c in IN_DEFAULT_SUITE else (pytest.mark.slow,))
        for c in sorted(RECORD["losses"])
    ],
)
def test_losses_match_the_record(case):
  method, augmentation = case.split("-", 1)
  got = golden_losses.losses(method, augmentation)
  want = RECORD["losses"][case]
  if golden_losses.machine() == RECORD["machine"]:
    assert got == want, f"{case}: {got} != {want} (recorded on this machine: bit-identical)"
  else:
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=case)

"""DeviceIdleMeter: idle = sum of max(0, dispatch[k+1] - done[k]), checked by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocl_jax.train.device_idle import DeviceIdleMeter


class FakeSteps:
  """A step 'finishes' when the meter waits on it: the clock then reads its done time."""

  def __init__(self):
    self.now = 0.0

  def wait(self, done_at: float) -> None:
    self.now = done_at

  def clock(self) -> float:
    return self.now


def test_idle_is_the_gap_between_a_step_finishing_and_the_next_dispatch():
  fake = FakeSteps()
  with DeviceIdleMeter(wait=fake.wait, clock=fake.clock) as meter:
    # (dispatched at, done at): step 1 is queued before step 0 finishes (no idle); the
    # devices then wait 3 s for step 2 and 0.5 s for step 3.
    for dispatch, done in [(0.0, 5.0), (1.0, 9.0)]:
      meter.dispatched(dispatch, done)
    assert meter.take(flush=True) == 0.0
    for dispatch, done in [(12.0, 14.0), (14.5, 20.0)]:
      meter.dispatched(dispatch, done)
    assert meter.take(flush=True) == pytest.approx(3.5)
    assert meter.take() == 0.0  # read and reset


def test_idle_spans_the_reads():
  fake = FakeSteps()
  with DeviceIdleMeter(wait=fake.wait, clock=fake.clock) as meter:
    meter.dispatched(0.0, 2.0)
    assert meter.take(flush=True) == 0.0  # the first step has no previous one
    for dispatch, done in [(4.0, 6.0), (6.0, 7.0), (10.0, 11.0)]:
      meter.dispatched(dispatch, done)
    assert meter.take(flush=True) == pytest.approx((4 - 2) + 0 + (10 - 7))


def test_a_failing_wait_does_not_stop_the_meter():
  fake = FakeSteps()

  def wait(done_at):
    fake.wait(abs(done_at))
    if done_at < 0:
      raise RuntimeError("step failed")

  with DeviceIdleMeter(wait=wait, clock=fake.clock) as meter:
    meter.dispatched(0.0, -1.0)
    meter.dispatched(2.0, 3.0)
    assert meter.take(flush=True) == pytest.approx(1.0)


def test_run_step_watches_the_metrics_of_a_donating_step():
  step = jax.jit(
      lambda state, batch: (state + batch, {"loss": (state * batch).sum()}), donate_argnums=0
  )
  state = jnp.zeros(3)
  with DeviceIdleMeter() as meter:
    for i in range(3):
      state, metrics = meter.run_step(step, state, jnp.full(3, float(i)))
    assert 0.0 <= meter.take(flush=True) < 5.0
  np.testing.assert_array_equal(state, [3.0, 3.0, 3.0])
  assert float(metrics["loss"]) == 3 * 1.0 * 2.0

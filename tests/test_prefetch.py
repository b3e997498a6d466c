"""BackgroundPrefetch: the same items in the same order, errors in the consumer, a clean stop."""

import threading
import time

import pytest

from ocl_jax.data.prefetch import BackgroundPrefetch


def test_same_items_in_order():
  assert list(BackgroundPrefetch(iter(range(50)), 3)) == list(range(50))


def test_stays_at_most_size_items_ahead():
  produced = []

  def items():
    for i in range(100):
      produced.append(i)
      yield i

  it = BackgroundPrefetch(items(), 4)
  assert next(it) == 0
  time.sleep(0.3)
  # 1 taken + 4 queued + 1 held by the producer waiting for room
  assert len(produced) <= 6
  it.close()


def test_an_error_of_the_iterator_is_raised_by_next():
  def items():
    yield 1
    raise ValueError("corrupt record")

  it = BackgroundPrefetch(items(), 2)
  assert next(it) == 1
  with pytest.raises(ValueError, match="corrupt record"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_close_and_dropping_stop_the_thread():
  def forever():
    i = 0
    while True:
      yield i
      i += 1

  before = threading.active_count()
  it = BackgroundPrefetch(forever(), 2)
  next(it)
  it.close()
  with pytest.raises(StopIteration):
    next(it)
  it = BackgroundPrefetch(forever(), 2)
  next(it)
  del it
  deadline = time.time() + 5
  while threading.active_count() > before and time.time() < deadline:
    time.sleep(0.05)
  assert threading.active_count() == before


def test_size_must_be_positive():
  with pytest.raises(ValueError, match="size"):
    BackgroundPrefetch(iter([]), 0)

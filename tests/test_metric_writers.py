"""ocl_jax.metric_writers: the events TensorBoard reads back, the same with and without clu,
an import where clu/TensorFlow/TFDS are missing, and the progress reporter's steps/s."""

import io
import logging as std_logging
import os
import subprocess
import sys
import threading

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from ocl_jax import metric_writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGES = np.arange(2 * 5 * 7 * 3, dtype=np.uint8).reshape(2, 5, 7, 3)


def write_example(logdir: str, backend: str) -> None:
  """The calls the loop makes: hyperparameters, scalars at two steps, an image batch."""
  writer = metric_writers.create_writer(logdir, backend=backend, log_hparams=False)
  writer.write_hparams({"optim": {"base_lr": 0.03}, "method": "moco", "ema": True, "k": 4})
  writer.write_scalars(1, {"loss": 0.5, "skipped_steps": 0})
  writer.write_scalars(2, {"loss": 0.25, "skipped_steps": 3})
  writer.write_images(2, {"views": IMAGES})
  writer.close()


def read_events(logdir: str) -> dict[str, list]:
  """tag -> [(step, value)]: scalars as floats, images as decoded arrays, hparams as a dict."""
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()[event_accumulator.TENSORS]:
    plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
    rows = []
    for event in acc.Tensors(tag):
      if plugin == "scalars":
        value = float(tensor_util.make_ndarray(event.tensor_proto))
      elif plugin == "images":
        strings = tensor_util.make_ndarray(event.tensor_proto)
        pngs = [np.asarray(Image.open(io.BytesIO(s))) for s in strings[2:]]
        value = (int(strings[0]), int(strings[1]), np.stack(pngs))
      else:
        data = plugin_data_pb2.HParamsPluginData.FromString(
            acc.SummaryMetadata(tag).plugin_data.content
        )
        value = {
            k: v.WhichOneof("kind") + "=" + str(getattr(v, v.WhichOneof("kind")))
            for k, v in data.session_start_info.hparams.items()
        }
      rows.append((event.step, plugin, value))
    out[tag] = rows
  return out


def check_example(events: dict[str, list]) -> None:
  assert [(s, v) for s, _, v in events["loss"]] == [(1, 0.5), (2, 0.25)]
  assert [(s, v) for s, _, v in events["skipped_steps"]] == [(1, 0.0), (2, 3.0)]
  [(step, plugin, (width, height, images))] = events["views"]
  assert (step, plugin, width, height) == (2, "images", 7, 5)
  np.testing.assert_array_equal(images, IMAGES)


def test_tensorboard_backend_writes_scalars_and_images(tmp_path):
  write_example(str(tmp_path), backend="tensorboard")
  events = read_events(str(tmp_path))
  check_example(events)
  [(_, plugin, hparams)] = events["_hparams_/session_start_info"]
  assert plugin == "hparams"
  assert hparams == {
      "optim.base_lr": "number_value=0.03",
      "method": "string_value=moco",
      "ema": "bool_value=True",
      "k": "number_value=4.0",
  }


def test_clu_and_tensorboard_backends_write_the_same_events(tmp_path):
  pytest.importorskip("clu.metric_writers")
  write_example(str(tmp_path / "clu"), backend="clu")
  write_example(str(tmp_path / "tb"), backend="tensorboard")
  with_clu, without = read_events(str(tmp_path / "clu")), read_events(str(tmp_path / "tb"))
  assert sorted(with_clu) == sorted(without)
  check_example(with_clu)
  for tag in with_clu:
    for (s1, p1, v1), (s2, p2, v2) in zip(with_clu[tag], without[tag], strict=True):
      assert (s1, p1) == (s2, p2)
      if p1 == "images":
        assert v1[:2] == v2[:2]
        np.testing.assert_array_equal(v1[2], v2[2])
      else:
        assert v1 == v2


def test_log_lines_keep_clus_format(caplog):
  caplog.set_level(std_logging.INFO)
  writer = metric_writers.create_writer("unused", just_logging=True)
  writer.write_scalars(7, {"loss": 0.123456789, "skipped_steps": 2, "a": 1e-9})
  writer.write_hparams({"x": 1})
  writer.close()
  messages = [r.getMessage() for r in caplog.records]
  assert "[7] a=1e-09, loss=0.123457, skipped_steps=2" in messages
  assert "[Hyperparameters] {'x': 1}" in messages


def test_async_writer_runs_off_thread_in_order_and_reraises():
  class Recorder:

    def __init__(self):
      self.calls = []

    def write_scalars(self, step, scalars):
      if "boom" in scalars:
        raise RuntimeError("boom")
      self.calls.append((step, threading.current_thread() is threading.main_thread()))

    def flush(self):
      pass

    def close(self):
      pass

  recorder = Recorder()
  writer = metric_writers.AsyncWriter([recorder])
  for step in range(5):
    writer.write_scalars(step, {"loss": 1.0})
  writer.flush()
  assert recorder.calls == [(step, False) for step in range(5)]
  writer.write_scalars(5, {"boom": 1.0})
  with pytest.raises(RuntimeError, match="boom"):
    writer.flush()
  writer.close()


BLOCKER = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_without(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess:
  script = f"BLOCKED = {blocked!r}\n" + BLOCKER + body
  return subprocess.run(
      [sys.executable, "-c", script],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, "PYTHONPATH": ROOT},
  )


def test_writes_events_without_clu_tensorflow_and_tfds(tmp_path):
  body = f"""
import numpy as np
from ocl_jax import metric_writers
writer = metric_writers.create_writer({str(tmp_path)!r}, log_hparams=False)
print(type(writer.writers[-1]).__name__)
writer.write_hparams({{"optim": {{"base_lr": 0.03}}, "method": "moco", "ema": True, "k": 4}})
writer.write_scalars(1, {{"loss": 0.5, "skipped_steps": 0}})
writer.write_scalars(2, {{"loss": 0.25, "skipped_steps": 3}})
writer.write_images(2, {{"views": np.arange(210, dtype=np.uint8).reshape(2, 5, 7, 3)}})
writer.close()
assert not {{"clu", "tensorflow", "tensorflow_datasets"}} & set(sys.modules), sorted(sys.modules)
"""
  result = run_without(("clu", "tensorflow", "tensorflow_datasets"), body)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["TensorBoardWriter"]
  check_example(read_events(str(tmp_path)))


def test_logs_only_with_one_warning_without_tensorboard(tmp_path):
  body = f"""
from ocl_jax import metric_writers
for _ in range(2):
  writer = metric_writers.create_writer({str(tmp_path)!r})
  assert len(writer.writers) == 1, writer.writers
  writer.write_scalars(1, {{"loss": 0.5}})
  writer.close()
"""
  result = run_without(("clu", "tensorflow", "tensorflow_datasets", "tensorboard"), body)
  assert result.returncode == 0, result.stderr
  assert result.stderr.count("no TensorBoard event files are written") == 1, result.stderr
  assert "pip install tensorboard" in result.stderr
  assert not os.listdir(tmp_path)


class RecordingWriter:

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, scalars))


def test_report_progress_steps_per_second_with_a_fake_clock(caplog):
  caplog.set_level(std_logging.INFO)
  now = [100.0]
  writer = RecordingWriter()
  report = metric_writers.ReportProgress(num_train_steps=10, writer=writer, clock=lambda: now[0])
  fired = []
  # (step, time): starts the clock at step 1; 30 s later is under every_secs=60; at 161 s
  # the 60 s have passed; the last step always reports.
  for step, t in [(1, 100.0), (2, 130.0), (3, 161.0), (4, 170.0), (10, 175.0)]:
    now[0] = t
    fired.append(report(step))
  assert fired == [False, False, True, False, True]
  assert writer.scalars == [
      (3, {"steps_per_sec": pytest.approx(2 / 61)}),
      (3, {"uptime": pytest.approx(61.0)}),
      (10, {"steps_per_sec": pytest.approx(7 / 14)}),
      (10, {"uptime": pytest.approx(75.0)}),
  ]
  messages = [r.getMessage() for r in caplog.records]
  assert "Progress: 0.0 steps/s, 30.0% (3/10), ETA: 3m" in messages
  assert "Progress: 0.5 steps/s, 100.0% (10/10), ETA: 0m" in messages


def test_format_seconds():
  assert metric_writers.format_seconds(123456.7) == "1d10h17m"
  assert metric_writers.format_seconds(59) == "0m"


def test_close_closes_the_writers_after_a_failed_write_then_raises():
  class Failing:
    closed = False

    def write_scalars(self, step, scalars):
      raise OSError("disk full")

    def close(self):
      self.closed = True

  failing = Failing()
  writer = metric_writers.AsyncWriter([failing])
  writer.write_scalars(1, {"loss": 1.0})
  with pytest.raises(OSError, match="disk full"):
    writer.close()
  assert failing.closed
  writer.close()  # a second close does nothing
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(2, {"loss": 1.0})

"""Entry point: `python -m ocl_jax.main --config=configs/demo.py --workdir=DIR`.

Thin on purpose: flags, multi-process start-up, logging of the platform, then
the mode's function. Several processes (hosts) form one job with
`--distributed=auto` (TPU VMs, SLURM, ...) or an explicit
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (also read
from OCL_COORDINATOR_ADDRESS, OCL_NUM_PROCESSES, OCL_PROCESS_ID); see launch/.
"""

import importlib
import os
import signal
import sys
from typing import Any

# TensorFlow, when a TFDS dataset or an image folder is read (data/tf_readers.py), only feeds
# the host pipeline (decoding, resizing), which oneDNN's custom ops do not touch (its batches
# are byte-identical either way); off, TF also prints no notice about them. Its C++ INFO lines
# are not for the console either. Both must be set before TF loads.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ocl_jax import console, parallel, paths  # noqa: E402
from ocl_jax.configuration import save_config_json, validate_config  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
flags.DEFINE_enum(
    "distributed",
    "off",
    ["off", "auto"],
    "'auto': jax.distributed.initialize() detects the cluster (TPU VM pods, SLURM, "
    "...); 'off': one process unless --num_processes > 1.",
)
flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("OCL_COORDINATOR_ADDRESS"),
    "HOST:PORT of process 0's coordinator service (multi-process jobs).",
)
flags.DEFINE_integer(
    "num_processes",
    int(os.environ.get("OCL_NUM_PROCESSES", "1")),
    "Processes in the job; > 1 starts JAX's distributed runtime.",
)
flags.DEFINE_integer(
    "process_id",
    int(os.environ.get("OCL_PROCESS_ID", "0")),
    "This process's index in [0, num_processes).",
)
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "On a CPU host, split the CPU into this many JAX devices (0, the default: "
    "one per core, at most the largest count dividing the batch; 1: one device); "
    "the pmapped step then runs each device's share on its own core (on 2 cores "
    "the step ~1.5x faster, the whole main job ~1.1x: README, 'Run time'), with "
    "the same results up to rounding. Ignored when "
    "XLA_FLAGS already sets a device count.",
)
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  console.show_on_console(verbose=FLAGS["verbosity"].present)
  try:
    parallel.use_cpu_devices(
        FLAGS.cpu_devices, FLAGS.config.batch_size
    )  # before JAX's backends start
  except ValueError as e:
    raise app.UsageError(f"--{e}") from e
  initialize_distributed(
      FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )
  # Every path the user typed (relative or with ~) is made absolute once, here.
  workdir = paths.resolve(FLAGS.workdir)
  config = paths.resolve_config(FLAGS.config)
  validate_config(config)
  log_file = console.log_to_file(workdir)
  console.route_stray_tracebacks()
  logging.info("Full log: %s", log_file)
  logging.info(
      "JAX process %d/%d, %d local devices %s, %d devices in all",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.local_devices(),
      jax.device_count(),
  )
  if jax.process_index() == 0:
    save_config_json(config, os.path.join(workdir, "config.json"))
  from ocl_jax import preemption

  try:
    run_mode(config, workdir)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(e.exit_status)
  except KeyboardInterrupt:
    logging.warning("Interrupted (a second Ctrl-C): stopped without saving the current step")
    sys.exit(128 + signal.SIGINT)
  except Exception as e:  # noqa: BLE001  one paragraph for the person; the traceback to the log
    logging.info("The run stopped on this error:", exc_info=True)
    console.report_error(e, log_file)
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override (`--config.batchsize=3`) told in
  one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    text = text.strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    usage = "python -m ocl_jax.main --config=FILE --workdir=DIR [--config.FIELD=VALUE ...]"
    sys.stderr.write(f"Error in the command line: {text}\nUsage: {usage}\n")
    sys.exit(2)


def initialize_distributed(
    mode: str, coordinator_address: str | None, num_processes: int, process_id: int
) -> None:
  """Join the multi-process job, if any; must run before any other JAX call.

  On one process (the default) nothing happens. CPU processes exchange
  collectives over gloo (TCP), which older JAX versions do not pick by default.
  """
  if mode == "off" and num_processes <= 1:
    return
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if mode == "auto":
    logging.info("Initialising JAX's distributed runtime from the cluster environment")
    jax.distributed.initialize()
    return
  if not coordinator_address:
    raise app.UsageError(
        "--num_processes > 1 needs --coordinator_address=HOST:PORT " "(or OCL_COORDINATOR_ADDRESS)"
    )
  if not 0 <= process_id < num_processes:
    raise app.UsageError(f"--process_id={process_id} is not in [0, {num_processes})")
  logging.info(
      "Process %d of %d joining coordinator %s", process_id, num_processes, coordinator_address
  )
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


# config.mode -> "module:function(config, workdir)"; imported on use, so a mode loads only its code.
MODE_RUNNERS = {
    "train": "ocl_jax.train.loop:train_and_evaluate",
    "eval": "ocl_jax.evaluation.evaluate:run",
    "pipeline": "ocl_jax.pipeline:run",
    "study": "ocl_jax.study:run",
    "save_boxes": "ocl_jax.discovery.discover:run_save_boxes",
    "save_masks": "ocl_jax.discovery.discover:run_save_masks",
    "eval_localization": "ocl_jax.discovery.discover:run_eval_localization",
}


def run_mode(config, workdir: str) -> Any:
  """Run `config.mode` into `workdir`; relative and `~` paths are resolved by the runners."""
  module, function = MODE_RUNNERS[config.mode].split(":")
  return getattr(importlib.import_module(module), function)(config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

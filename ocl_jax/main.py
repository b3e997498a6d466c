"""Entry point: `python -m ocl_jax.main --config=configs/demo.py --workdir=DIR`.

Thin on purpose: flags, multi-process start-up, logging of the platform, then
the mode's function. Several processes (hosts) form one job with
`--distributed=auto` (TPU VMs, SLURM, ...) or an explicit
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (also read
from OCL_COORDINATOR_ADDRESS, OCL_NUM_PROCESSES, OCL_PROCESS_ID); see launch/.
"""

import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from ocl_jax import parallel
from ocl_jax.configuration import validate_config

FLAGS = flags.FLAGS


class _QuietLibraries(logging.logging.Filter):
  """Drop the per-file INFO chatter of Orbax and TFDS; keep their warnings."""
  NOISY = ("/orbax/", "/tensorflow_datasets/")

  def filter(self, record) -> bool:
    return record.levelno >= logging.logging.WARNING or not any(n in record.pathname for n in self.NOISY)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                  "'auto': jax.distributed.initialize() detects the cluster (TPU VM pods, SLURM, "
                  "...); 'off': one process unless --num_processes > 1.")
flags.DEFINE_string("coordinator_address", os.environ.get("OCL_COORDINATOR_ADDRESS"),
                    "HOST:PORT of process 0's coordinator service (multi-process jobs).")
flags.DEFINE_integer("num_processes", int(os.environ.get("OCL_NUM_PROCESSES", "1")),
                     "Processes in the job; > 1 starts JAX's distributed runtime.")
flags.DEFINE_integer("process_id", int(os.environ.get("OCL_PROCESS_ID", "0")),
                     "This process's index in [0, num_processes).")
flags.DEFINE_integer("cpu_devices", 1,
                     "On a CPU host, split the CPU into this many JAX devices (0: one per core), "
                     "the largest count dividing the batch; the pmapped step then runs each "
                     "device's share on its own core (~1.3x faster on 2 cores). BG-mixup and "
                     "Mixup draw donors per device, so their results depend on the count. "
                     "Ignored when XLA_FLAGS already sets a device count.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_QuietLibraries())
  try:
    parallel.use_cpu_devices(FLAGS.cpu_devices, FLAGS.config.batch_size)  # before JAX's backends start
  except ValueError as e:
    raise app.UsageError(f"--{e}") from e
  initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  # tf.data only feeds the host; keep TensorFlow off any accelerator.
  tf.config.experimental.set_visible_devices([], "GPU")
  logging.info("JAX process %d/%d, %d local devices %s, %d devices in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.local_devices(),
               jax.device_count())
  config = FLAGS.config
  validate_config(config)
  from ocl_jax import preemption
  try:
    _run_mode(config)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.EXIT_STATUS)


def initialize_distributed(mode: str, coordinator_address: str | None, num_processes: int,
                           process_id: int) -> None:
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
    raise app.UsageError("--num_processes > 1 needs --coordinator_address=HOST:PORT "
                         "(or OCL_COORDINATOR_ADDRESS)")
  if not 0 <= process_id < num_processes:
    raise app.UsageError(f"--process_id={process_id} is not in [0, {num_processes})")
  logging.info("Process %d of %d joining coordinator %s", process_id, num_processes,
               coordinator_address)
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _run_mode(config) -> None:
  if config.mode == "train":
    from ocl_jax import train
    train.train_and_evaluate(config, FLAGS.workdir)
  elif config.mode == "eval":
    from ocl_jax import evaluation
    evaluation.run(config, FLAGS.workdir)
  elif config.mode == "pipeline":
    from ocl_jax import pipeline
    pipeline.validate_pipeline(config)
    pipeline.run(config, FLAGS.workdir)
  else:
    from ocl_jax import object_discovery
    object_discovery.run(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

"""Entry point: `python -m ocl_jax.main --config=configs/demo.py --workdir=DIR`.

Thin on purpose: flags, logging of the platform, then the mode's function.
"""

import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from ocl_jax.configuration import validate_config

FLAGS = flags.FLAGS


class _QuietLibraries(logging.logging.Filter):
  """Drop the per-file INFO chatter of Orbax and TFDS; keep their warnings."""
  NOISY = ("/orbax/", "/tensorflow_datasets/")

  def filter(self, record) -> bool:
    return record.levelno >= logging.logging.WARNING or not any(n in record.pathname for n in self.NOISY)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_QuietLibraries())
  # tf.data only feeds the host; keep TensorFlow off any accelerator.
  tf.config.experimental.set_visible_devices([], "GPU")
  logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  config = FLAGS.config
  validate_config(config)
  from ocl_jax import preemption
  try:
    _run_mode(config)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.EXIT_STATUS)


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

"""MoCo v2 on `scenes/small` with a small ResNet: one pretraining run, minutes on 2 CPU cores.

The settings every scenes config (and the demo pipeline) starts from.

Layer4 is 3x3 at 96 px (standard stem). Smaller sizes also run at full speed:
maps smaller than the kernel, a slow path of XLA:CPU (BENCHMARKS.md), are computed
as a patch matmul (models.Conv).
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "default.py")
  c.dataset.name = "scenes/small"
  c.dataset.image_size = 96
  c.augment.crop_size = 96
  c.model.arch = "resnet18"
  c.model.width = 32
  c.batch_size = 64
  c.moco.queue_size = 1024  # << the 4k training images, so few stale positives in the queue
  c.moco.momentum = 0.99  # short run: let the key encoder follow faster
  c.optim.base_lr = 0.12  # lr 0.03 for batch 64 after scaling; short schedule
  c.num_epochs = 0
  c.num_train_steps = 400
  c.log_every_steps = 25
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.probe.eval_batches = -1
  c.probe.learning_rate = 3e-3
  # layer4 is 3x3 at 96 px: stride-1 layer3 and layer4 give ContraCAM 12x12 maps.
  c.contracam.expand_res = 4
  return c

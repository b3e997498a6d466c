"""MoCo v2 on scenes/small (configs/scenes.py) with background mixup (docs/method.md#bg-mixup).

Masks default to the dataset's true foreground masks; the paper's setting uses
ContraCAM masks (T=1) of a pretrained model instead:
  python -m ocl_jax.main --config=configs/scenes.py --workdir=W0
  python -m ocl_jax.main --config=configs/scenes.py --workdir=W0 --config.mode=save_masks
  python -m ocl_jax.main --config=configs/scenes_bgmix.py --workdir=W1 \
      --config.bg_mixup.masks=W0/masks_train
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "scenes.py")
  c.bg_mixup.enabled = True
  c.bg_mixup.masks = "gt"
  return c

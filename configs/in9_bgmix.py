"""MoCo v2 on ImageNet-9 (configs/in9.py) with background mixup (docs/method.md#bg-mixup).

The masks are ContraCAM masks (T=1) of a vanilla model pretrained on the same folder.
Three runs (BG = the bg_challenge folder):
  # 1. vanilla pretraining
  python -m ocl_jax.main --config=configs/in9.py --workdir=W0 \
      --config.dataset.name=folder:BG/original/train --config.evaluation.folders.imagenet9=BG
  # 2. its ContraCAM masks of every training image -> W0/masks_train/<image id>.png
  python -m ocl_jax.main --config=configs/in9.py --workdir=W0 --config.mode=save_masks \
      --config.dataset.name=folder:BG/original/train --config.evaluation.folders.imagenet9=BG
  # 3. retraining with BG-mixup
  python -m ocl_jax.main --config=configs/in9_bgmix.py --workdir=W1 \
      --config.dataset.name=folder:BG/original/train --config.evaluation.folders.imagenet9=BG \
      --config.bg_mixup.masks=W0/masks_train
As in the release, step 2's masks are the raw ContraCAM maps (its mask command has no
CRF; `--config.contracam.crf_masks=True` would refine them with the dense CRF).
Image ids are the files' paths below original/train (see configs/default.py,
dataset.name), so step 3 must read the same folder as step 2. Every training image
needs a mask; images that could not be decoded in step 2 are skipped in step 3 too.
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "in9.py")
  c.bg_mixup.enabled = True
  c.bg_mixup.masks = "REQUIRED: --config.bg_mixup.masks=PATH/masks_train"
  return c

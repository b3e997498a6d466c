"""MoCo v2 on ImageNet-9 (the `bg_challenge` folder of Xiao et al. 2020), paper settings.

docs/method.md#pretraining: ResNet-50, 224 px crops, global batch 256, lr 0.03 x batch/256,
cosine to 1e-3, 800 epochs, queue 65,536, tau 0.2, EMA 0.999. It trains on the image
folder original/train (9 classes, ~45k images) and is evaluated on ImageNet-9's
original / mixed_same / mixed_rand / only_fg (docs/method.md#evaluation). The online probe
and ContraCAM's evaluation use the sibling folder original/val.

Two paths are required on the command line (BG = the bg_challenge folder):
  python -m ocl_jax.main --config=configs/in9.py --workdir=W0 \
      --config.dataset.name=folder:BG/original/train --config.evaluation.folders.imagenet9=BG
Then `--config.mode=save_masks` (same flags) writes ContraCAM masks for BG-mixup
(configs/in9_bgmix.py) to W0/masks_train, `--config.mode=save_boxes` OA-crop boxes
to W0/boxes_train.txt (`--config.contracam.crf=True` reproduces the release's `--apply_crf`),
and `--config.mode=eval` the frozen-encoder evaluation.
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "default.py")
  c.dataset.name = "REQUIRED: --config.dataset.name=folder:PATH/bg_challenge/original/train"
  c.dataset.train_split = "train"  # a folder trains on all of it
  c.dataset.eval_split = "val"  # online probe: the sibling folder original/val
  c.dataset.image_size = 256  # host resize; crops are taken on device
  c.augment.crop_size = 224
  c.model.arch = "resnet50"
  c.batch_size = 256
  c.num_epochs = 800
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  c.contracam.split = "train"  # masks / boxes of the training images (W/masks_train)
  c.contracam.eval_split = "val"  # no ground truth: eval_localization reports boxes only
  # ContraCAM with the release's score, as the paper's boxes and masks were made (the default
  # per-image form gives the same T=1 maps but other T=10 boxes; docs/method.md#release-quirks).
  c.contracam.official_score = True
  c.evaluation.datasets = ("imagenet9",)
  c.evaluation.folders.imagenet9 = (
      "REQUIRED: --config.evaluation.folders.imagenet9=PATH/bg_challenge"
  )
  c.evaluation.image_size = 224
  c.evaluation.crop_fraction = 0.875  # resize to 256, centre crop 224 (ImageNet protocol)
  return c

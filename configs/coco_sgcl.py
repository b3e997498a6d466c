"""Saliency-guided MoCo v2 (docs/method.md#sgcl) on COCO 2017, the paper setting of
configs/coco.py.

Online saliency of the target network at 128 px (the training image resized),
refreshed every step; both global crops centred by saliency (temperature 1),
pair weights (a_u a_v)^1, and two 96 px local crops (multi-crop). With
--config.saliency.every_k_steps=K > 1 the maps of all 118k images are kept in
the train state (118k x 16 x 16 bfloat16, 60 MB per device) and reused for K
steps; the cheapest setting that still tracks the model is about one epoch
(K ~ 460 at batch 256).

  python -m ocl_jax.main --config=configs/coco_sgcl.py --workdir=W \\
      --config.dataset.data_dir=/path/to/tfds
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "coco.py")
  s = c.saliency
  s.enabled = True
  s.resolution = 128
  s.expand_res = 2  # layer4 at stride 16: an 8x8 ContraCAM map at 128 px
  s.map_size = 16
  s.every_k_steps = 1
  s.crop_temperature = 1.0
  s.gamma = 1.0
  s.num_local_crops = 2
  s.local_crop_size = 96
  s.local_scale = (0.05, 0.4)
  s.coverage_masks = ""  # TFDS coco/2017 has no foreground masks (boxes only)
  return c

"""MoCo v2 on COCO 2017 with OA-crop from ground-truth boxes (docs/method.md#oa-crop).

configs/coco.py plus object-aware random crop: per step each image picks one
ground-truth instance box (area > 1% of the image, expanded by 20% of its
size per side) and both views crop inside it.
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "coco.py")
  c.object_aware.crop = True
  c.object_aware.boxes = "gt"
  return c

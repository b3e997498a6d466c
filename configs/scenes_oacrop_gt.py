"""MoCo v2 on scenes/small (configs/scenes.py) with OA-crop from ground-truth boxes
(docs/method.md#oa-crop)."""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "scenes.py")
  c.object_aware.crop = True
  c.object_aware.boxes = "gt"
  return c

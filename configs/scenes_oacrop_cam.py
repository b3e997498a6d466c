"""MoCo v2 on scenes/small (configs/scenes.py) with OA-crop from ContraCAM boxes
(docs/method.md#oa-crop).

Two runs: first pretrain and save the boxes of the training split,
  python -m ocl_jax.main --config=configs/scenes.py --workdir=W0
  python -m ocl_jax.main --config=configs/scenes.py --workdir=W0 --config.mode=save_boxes
which writes W0/boxes_train.txt; then train with them:
  python -m ocl_jax.main --config=configs/scenes_oacrop_cam.py --workdir=W1 \
      --config.object_aware.boxes=W0/boxes_train.txt
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "scenes.py")
  c.object_aware.crop = True
  c.object_aware.boxes = "REQUIRED: --config.object_aware.boxes=PATH/boxes_train.txt"
  return c

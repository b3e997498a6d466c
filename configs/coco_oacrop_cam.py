"""MoCo v2 on COCO 2017 with OA-crop from ContraCAM boxes (docs/method.md#oa-crop).

The boxes come from a box file in the release format, given on the command line:
  --config.object_aware.boxes=PATH
It is produced by a pretrained run with `--config.mode=save_boxes` (see
configs/coco.py), which writes WORKDIR/boxes_train.txt for contracam.split=train.
The release made its boxes with `--apply_crf` (a dense CRF on each map): add
`--config.contracam.crf=True` to the save_boxes command to do the same.
Every training image must be in the file unless
--config.object_aware.tolerate_box_errors=True (those images use the whole image).
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "coco.py")
  c.object_aware.crop = True
  c.object_aware.boxes = "REQUIRED: --config.object_aware.boxes=PATH/boxes_train.txt"
  return c

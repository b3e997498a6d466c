"""MoCo v2 on COCO 2017 train (TFDS `coco/2017` in --config.dataset.data_dir), paper settings.

docs/method.md#pretraining: ResNet-18, 224 px, global batch 256, lr 0.03 x batch/256,
cosine to 1e-3, 800 epochs, queue 65,536, tau 0.2, EMA 0.999. Training images reach the
device as 448 px squares, the online probe's and ContraCAM's as 256 px ones (BENCHMARKS.md,
"Host image size and crop sharpness").
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "default.py")
  c.dataset.name = "coco/2017"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"  # online probe: class of the largest instance
  c.dataset.image_size = 256  # host square of the online probe and the ContraCAM modes
  # Host square of the training batches, cropped on device: at 448 (near a 640x480 image's
  # short side) small crops keep most of the source's detail; 256 upsamples 93% of them.
  c.dataset.train_image_size = 448
  c.augment.crop_size = 224
  c.model.arch = "resnet18"
  c.batch_size = 256
  c.num_epochs = 800
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  # ContraCAM with the release's score, as the paper's boxes and masks were made (the default
  # per-image form gives the same T=1 maps but other T=10 boxes; docs/method.md#release-quirks).
  c.contracam.official_score = True
  # The release's COCO box command uses --apply_crf, and its cleaning keeps every pixel with a
  # map value of at least 1/255 (docs/method.md#release-quirks, 14).
  c.contracam.crf = True
  c.contracam.clean_threshold = 1 / 255
  return c

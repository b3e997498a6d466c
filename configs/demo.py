"""The main job: the whole story on the embedded `scenes/small`, in one command on 2 CPU cores.

  python -m ocl_jax.main --config=configs/demo.py --workdir=/tmp/ocl_demo

Runs the pipeline (ocl_jax/pipeline.py) into the workdir, each stage resumable:
vanilla MoCo v2 pretraining -> ContraCAM boxes and masks of the training split
-> OA-crop and BG-mixup pretraining from scratch at the same number of steps
-> SGCL pretraining (online saliency of the model itself, configs/scenes_sgcl.py's
settings) at the same number of steps -> linear probe and kNN on every `scenes` test split
(background gap =
test - mixed_rand) and ContraCAM localisation of every model. It prints the
results table and writes WORKDIR/results.{md,json}.

Sized to finish in about 14 minutes on 2 CPU cores (README); a
longer, more faithful run: --config.num_train_steps=2000.
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "scenes.py")
  c.mode = "pipeline"
  c.num_train_steps = 200
  c.eval_every_steps = 0  # the final table probes properly; skip the online-probe passes
  c.checkpoint_every_steps = 100
  # Boxes from ContraCAM at T=1: on this briefly trained model T=10 localised worse
  # (mIoU ~0.17 vs ~0.48, README), and T=1 gives boxes and masks from one pass.
  c.contracam.iterations = 1
  c.contracam.batch_size = 128
  c.evaluation.image_size = 96
  c.pipeline.localization_images = 500
  # The SGCL stage: configs/scenes_sgcl.py's saliency settings.
  s = c.saliency
  s.resolution, s.expand_res, s.map_size = 96, 2, 8
  s.every_k_steps, s.crop_temperature, s.gamma, s.num_local_crops = 1, 1.0, 1.0, 0
  s.coverage_masks = "gt"
  return c

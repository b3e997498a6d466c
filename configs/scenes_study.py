"""The main job over five seeds, with intervals: results/scenes_study.{json,md,png}.

  python -m ocl_jax.main --config=configs/scenes_study.py --workdir=workdirs/study \
      --config.study.results_dir=results

Runs configs/demo.py's pipeline for each of config.study.seeds into
WORKDIR/seed_<s> (resumable: finished seeds and stages are skipped), computes
the probe-free `scenes/feature/` measures of every model, and summarises every
metric per model over the seeds (mean, 95% interval) and per seed against
vanilla (paired differences). About 18 minutes per seed on 2 CPU cores.

Stability: a rerun of seed 0 with one JAX device (a rounding-level change),

  python -m ocl_jax.main --config=configs/demo.py --workdir=workdirs/study_seed0_one_device \
      --cpu_devices=1

then --config.study.perturbed=workdirs/study_seed0_one_device adds how far each
metric moved to the summary.
"""

from ocl_jax.configuration import load_sibling_config


def get_config():
  c = load_sibling_config(__file__, "demo.py")
  c.mode = "study"
  c.study.label = "configs/scenes_study.py"
  return c

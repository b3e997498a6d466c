"""Orbax checkpoints of the whole train state, with the model spec kept beside it.

Resuming checks that the checkpoint was written for the same model and that
every array has the shape the current config expects, so a checkpoint of
another architecture is a clear error instead of a silently wrong restore.

In a multi-process job every process calls save / restore / close (Orbax
synchronises them). The saved state is the replicated state as host NumPy,
which Orbax writes from process 0 only and every process reads back: the
checkpoint holds no device or process layout, so it resumes under any
process count. The workdir must be one directory that every process sees
(a shared or network file system).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ocl_jax.models import ModelSpec


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model / state the config describes."""


def check_same_structure(restored: Any, template: Any, source: str) -> None:
  """Raise CheckpointMismatchError naming the first path whose structure or shape differs."""
  flat_r, tree_r = jax.tree_util.tree_flatten_with_path(restored)
  flat_t, tree_t = jax.tree_util.tree_flatten_with_path(template)
  paths_r = {jax.tree_util.keystr(p): np.shape(v) for p, v in flat_r}
  paths_t = {jax.tree_util.keystr(p): np.shape(v) for p, v in flat_t}
  missing = sorted(set(paths_t) - set(paths_r))
  extra = sorted(set(paths_r) - set(paths_t))
  if missing or extra:
    raise CheckpointMismatchError(
        f"{source} has a different structure than the config's model: "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
    )
  for path, shape in paths_t.items():
    if paths_r[path] != shape:
      raise CheckpointMismatchError(
          f"{source}: {path} has shape {paths_r[path]}, the config's model expects {shape}"
      )


def check_variables(module: Any, variables: Any, source: str) -> None:
  """check_same_structure against the variables `module.init` would create (shapes only)."""
  template = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), np.zeros((2, 64, 64, 3), np.float32), train=False)
  )
  check_same_structure(variables, template, source)


class Checkpointer:
  """Periodic saves of the train state into `workdir/checkpoints`, keeping the newest N.

  Without `spec` and `config` it only reads (`restore_latest`, for inference)
  and creates nothing.
  """

  def __init__(
      self,
      workdir: str,
      spec: ModelSpec | None = None,
      config: ml_collections.ConfigDict | None = None,
  ):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.spec = spec
    self.config = config
    if config is None:
      options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_or(self, template: Any) -> Any:
    """The newest checkpoint restored into `template`'s structure, or `template` if none."""
    step = self.manager.latest_step()
    if jax.process_count() > 1:
      steps = multihost_utils.process_allgather(np.array(-1 if step is None else step, np.int32))
      if len(set(np.asarray(steps).tolist())) > 1:
        raise CheckpointMismatchError(
            f"The processes see different newest checkpoints in {self.directory} (steps "
            f"{np.asarray(steps).tolist()}, -1: none): every process must see the same workdir "
            "(a shared file system)"
        )
    if step is None:
      return template
    source = f"checkpoint {self.directory}/{step}"
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get("model") != self.spec.to_dict() or meta.get("method") != self.config.method:
      raise CheckpointMismatchError(
          f"{source} was written for method={meta.get('method')!r} model={meta.get('model')}, "
          f"but the config asks for method={self.config.method!r} model={self.spec.to_dict()}; "
          "use another --workdir or the matching config."
      )
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    ).state
    check_same_structure(restored, template, source)
    logging.info("Restored %s", source)
    return restored

  def restore_latest(self) -> tuple[int, dict[str, Any], Any]:
    """(step, metadata, state as saved) of the newest checkpoint, whatever model it holds.

    For inference, which takes the model from the metadata; resuming uses restore_or.
    """
    step = self.manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    state = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    ).state
    return step, meta, state

  def save(self, step: int, state: Any) -> None:
    meta = {
        "model": self.spec.to_dict(),
        "method": self.config.method,
        "step": int(step),
        "config": self.config.to_json_best_effort(),
    }
    self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

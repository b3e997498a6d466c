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

import hashlib
import json
import os
import re
import shutil
import time
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


class CheckpointCorruptError(ValueError):
  """A checkpoint's files cannot be read or do not match the digests written with them."""


class NonFiniteCheckpointError(ValueError):
  """A checkpoint that reads back intact holds NaN/inf parameters: resuming it cannot train."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint's asynchronous save failed in the background."""


# Config fields that set the shape of a state entry other than the model's parameters, so a
# shape mismatch there names the field to change, not just the array.
SHAPE_FIELDS = {
    "queue": ("moco.queue_size",),
    "bg_fifo": ("bg_mixup.fifo_size", "augment.crop_size"),  # (fifo_size, crop, crop, 3)
    "saliency_bank": ("saliency.map_size", "saliency.every_k_steps"),
    "saliency_stamp": ("saliency.every_k_steps",),
}


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_names(tree: Any) -> dict[str, Any]:
  """{'params.encoder.conv1.kernel': leaf, ...}: one naming for a TrainState, the dict Orbax
  saved it as and Orbax's metadata tree alike."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_name(e) for e in path): leaf for path, leaf in flat}


def digests(tree: Any) -> dict[str, str]:
  """sha256 of each array's bytes (host copy, C order), by leaf name."""
  out = {}
  for name, leaf in leaf_names(jax.device_get(tree)).items():
    a = np.ascontiguousarray(np.asarray(leaf))
    out[name] = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()
  return out


def _flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      flat.update(_flat_config(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def _shape(leaf: Any) -> tuple[int, ...] | None:
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else np.shape(leaf)


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
  """{'model.width': '4 (checkpoint) vs 8 (config)', ...} for every field that differs."""
  s, c = _flat_config(saved), _flat_config(current)
  return {
      k: f"{s.get(k, '(absent)')!r} (checkpoint) vs {c.get(k, '(absent)')!r} (config)"
      for k in sorted(set(s) | set(c))
      if s.get(k) != c.get(k)
  }


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _save_error(directory: str, e: BaseException) -> "CheckpointSaveError":
  """A failed save, told briefly; a full disk says so and what to do."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" in text or "No space left" in text or "ENOSPC" in text:
    return CheckpointSaveError(
        f"saving a checkpoint to {directory} failed: the disk is full. The checkpoints saved "
        "before are intact; free space (or lower keep_checkpoints) and run the same command "
        "again to resume, or use a --workdir on another disk"
    )
  return CheckpointSaveError(f"saving a checkpoint to {directory} failed: {_first_line(e)}")


def _read_error(e: BaseException) -> tuple[str | None, str]:
  """(the array a TensorStore read error names, or None; the most specific error line):
  Orbax wraps the error that names the array in a generic one."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for err in chain:
    found = re.search(r'Error reading "([^"/]+)/', str(err))
    if found:
      return found.group(1), _first_line(err)
  return None, _first_line(chain[0])


def check_same_structure(restored: Any, template: Any, source: str) -> None:
  """Raise CheckpointMismatchError naming the first path whose structure or shape differs."""
  flat_r, tree_r = jax.tree_util.tree_flatten_with_path(restored)
  flat_t, tree_t = jax.tree_util.tree_flatten_with_path(template)
  paths_r = {jax.tree_util.keystr(p): _shape(v) for p, v in flat_r}
  paths_t = {jax.tree_util.keystr(p): _shape(v) for p, v in flat_t}
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

  Each save also writes a sha256 digest of every array into the `meta` item;
  resuming checks the config against the checkpoint before Orbax reads any
  array, verifies the digests after, and falls back to the previous checkpoint
  when the newest cannot be read (a crash or a full disk while it was copied),
  moving the damaged one to `workdir/checkpoints.corrupt`.

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
    # Handlers named up front so item_metadata can read the saved shapes before any restore.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._closed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_or(self, template: Any) -> Any:
    """The newest readable checkpoint restored into `template`'s structure, or `template` if
    there is none. Unreadable newer ones are reported and set aside."""
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
    failed: list[int] = []
    errors: list[str] = []
    for s in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self._restore_step(s, template)
      except CheckpointCorruptError as e:
        logging.warning("%s; trying the previous checkpoint", e)
        failed.append(s)
        errors.append(str(e))
        continue
      if failed:
        self._set_aside(failed)
        logging.warning(
            "Resuming from checkpoint %s/%d: the newer checkpoint(s) %s could not be read and "
            "were moved to %s.corrupt",
            self.directory,
            s,
            failed,
            self.directory,
        )
      return restored
    raise CheckpointCorruptError(
        f"no checkpoint in {self.directory} can be read: " + "; ".join(errors)
    )

  def _set_aside(self, steps: list[int]) -> None:
    """Move unreadable checkpoints out of the manager's directory (process 0), so the run can
    write those steps again; `checkpoints.corrupt` keeps them for a post-mortem."""
    if jax.process_index() == 0:
      aside = f"{self.directory}.corrupt"
      os.makedirs(aside, exist_ok=True)
      for s in steps:
        target = os.path.join(aside, str(s))
        if os.path.exists(target):
          target = f"{target}.{int(time.time())}"
        shutil.move(os.path.join(self.directory, str(s)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ocl_jax.checkpointing.set_aside")
    self.manager.reload()

  def _restore_step(self, step: int, template: Any) -> Any:
    source = f"checkpoint {self.directory}/{step}"
    step_dir = os.path.join(self.directory, str(step))
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      if not isinstance(meta, dict):
        raise ValueError(f"holds {type(meta).__name__}, not a JSON object")
    except Exception as e:  # noqa: BLE001  any failure to read it means the file is damaged
      raise CheckpointCorruptError(
          f"{source} is unreadable: its metadata {step_dir}/meta/metadata cannot be read "
          f"({_first_line(e)})"
      ) from e
    self._check_meta(meta, source)
    self._warn_config_changes(meta, source)
    try:
      saved = leaf_names(self.manager.item_metadata(step)["state"])
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorruptError(
          f"{source} is unreadable: the array metadata in {step_dir}/state cannot be read "
          f"({_first_line(e)})"
      ) from e
    self._check_shapes(saved, template, meta, source)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      ).state
    except Exception as e:  # noqa: BLE001
      array, detail = _read_error(e)
      what = f"array {array}" if array else "its arrays"
      raise CheckpointCorruptError(
          f"{source} is unreadable: {what} cannot be read from {step_dir}/state ({detail})"
      ) from e
    check_same_structure(restored, template, source)
    self._verify(restored, meta, source, step_dir)
    logging.info("Restored %s", source)
    return restored

  def _warn_config_changes(self, meta: dict[str, Any], source: str) -> None:
    """One warning naming every config field that differs from the checkpoint's own (a
    resume with another learning rate or batch size trains on from weights made under the
    old one; fine when meant, a surprise when not)."""
    if self.config is None:
      return
    try:
      saved = json.loads(meta.get("config") or "{}")
      current = json.loads(self.config.to_json_best_effort())
    except (TypeError, ValueError):
      return
    if not isinstance(saved, dict) or not saved:
      return
    diffs = _differences(saved, current)
    if diffs:
      logging.warning(
          "Resuming %s under another config: %s",
          source,
          "; ".join(f"{k} {v}" for k, v in diffs.items()),
      )

  def _check_meta(self, meta: dict[str, Any], source: str) -> None:
    """Raise CheckpointMismatchError naming the model / method fields that differ."""
    model, method = meta.get("model"), meta.get("method")
    try:  # fields added since the checkpoint was written take their defaults
      model = ModelSpec.from_dict(model).to_dict()
    except (TypeError, ValueError, AttributeError):
      pass  # not a spec: the comparison below names what differs
    if model == self.spec.to_dict() and method == self.config.method:
      return
    diffs = _differences(
        {"method": method, "model": model if isinstance(model, dict) else {}},
        {"method": self.config.method, "model": self.spec.to_dict()},
    )
    raise CheckpointMismatchError(
        f"{source} was written for another model: "
        + ", ".join(f"{k} {v}" for k, v in diffs.items())
        + f" (method={method!r} model={model}, the config asks for "
        f"method={self.config.method!r} model={self.spec.to_dict()}); "
        "use another --workdir or the matching config."
    )

  def _check_shapes(
      self, saved: dict[str, Any], template: Any, meta: dict[str, Any], source: str
  ) -> None:
    """Compare the saved arrays' shapes with the template's before Orbax reads them, naming the
    config field behind a difference (e.g. moco.queue_size for `queue`)."""
    want = {k: _shape(v) for k, v in leaf_names(template).items()}
    have = {k: getattr(v, "shape", None) for k, v in saved.items()}
    problems = [f"{k} is not in the checkpoint" for k in sorted(set(want) - set(have))]
    problems += [
        f"{k} is in the checkpoint but not in the config's state"
        for k in sorted(set(have) - set(want))
    ]
    problems += [
        f"{k} has shape {tuple(have[k])} in the checkpoint, the config expects {want[k]}"
        for k in sorted(set(want) & set(have))
        if have[k] is not None and tuple(have[k]) != tuple(want[k])
    ]
    if not problems:
      return
    names = {p.split(" ", 1)[0] for p in problems}
    try:
      saved_config = json.loads(meta.get("config") or "{}")
      diffs = _differences(saved_config, json.loads(self.config.to_json_best_effort()))
    except ValueError:
      diffs = {}
    suspects = [f for n in names for f in SHAPE_FIELDS.get(n.split(".")[0], ()) if f in diffs]
    if not suspects:
      ignore = ("dataset.data_dir", "num_train_steps", "num_epochs", "keep_checkpoints")
      suspects = [f for f in diffs if not f.startswith(ignore)][:8]
    hint = (
        "; the config differs from the checkpoint's in "
        + ", ".join(f"{f} {diffs[f]}" for f in dict.fromkeys(suspects))
        if suspects
        else ""
    )
    raise CheckpointMismatchError(
        f"{source} does not fit the config's train state: "
        + "; ".join(problems[:5])
        + ("..." if len(problems) > 5 else "")
        + hint
        + ". Use another --workdir or the matching config."
    )

  def _verify(self, restored: Any, meta: dict[str, Any], source: str, step_dir: str) -> None:
    """Compare the restored arrays with the digests saved beside them; refuse NaN parameters."""
    host = jax.device_get(restored)
    expected = meta.get("digests")
    if not expected:
      logging.info("%s has no digests (written by an older version): restored unverified", source)
    else:
      got = digests(host)
      for name, digest in expected.items():
        if got.get(name) != digest:
          raise CheckpointCorruptError(
              f"{source} is corrupt: array {name} does not match the digest written with it "
              f"(its data in {step_dir}/state is damaged)"
          )
    for part in ("params", "target_params"):
      for name, leaf in leaf_names(getattr(host, part, None)).items():
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
          raise NonFiniteCheckpointError(
              f"{source} holds non-finite values in {part}.{name}: training cannot resume from "
              f"it. Delete {step_dir} to resume from the previous checkpoint, or use another "
              "--workdir."
          )

  def restore_latest(self) -> tuple[int, dict[str, Any], Any]:
    """(step, metadata, state as saved) of the newest checkpoint, whatever model it holds.

    For inference, which takes the model from the metadata; resuming uses restore_or. A
    damaged checkpoint is an error naming it and the array (its digests are verified), never
    a silent fallback: the caller asked for this workdir's newest model.
    """
    step = self.manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    source = f"checkpoint {self.directory}/{step}"
    step_dir = os.path.join(self.directory, str(step))
    hint = f"; delete {step_dir} to use the previous checkpoint"
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      state = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
      ).state
    except Exception as e:  # noqa: BLE001  any failure to read it means a file is damaged
      array, detail = _read_error(e)
      what = f"array {array}" if array else "its files"
      raise CheckpointCorruptError(
          f"{source} is unreadable: {what} cannot be read from {step_dir} ({detail}){hint}"
      ) from e
    got = digests(state)
    for name, digest in (meta.get("digests") or {}).items():
      if name in got and got[name] != digest:
        raise CheckpointCorruptError(
            f"{source} is corrupt: array {name} does not match the digest written with it{hint}"
        )
    return step, meta, state

  def check_for_errors(self) -> None:
    """Raise CheckpointSaveError if an asynchronous save failed in the background."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise _save_error(self.directory, e) from e

  def save(self, step: int, state: Any) -> None:
    """Start an asynchronous save of `state` (host arrays) with its digests."""
    self.check_for_errors()
    meta = {
        "model": self.spec.to_dict(),
        "method": self.config.method,
        "step": int(step),
        "config": self.config.to_json_best_effort(),
        "digest_algorithm": "sha256",
        "digests": digests(state),
    }
    logging.info("Saving the checkpoint of step %d to %s (in the background)", step, self.directory)
    try:
      self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      )
    except Exception as e:  # noqa: BLE001  (the previous save's error surfaces here too)
      raise _save_error(self.directory, e) from e

  def close(self) -> None:
    """Finish the pending save and close; raises CheckpointSaveError if that save failed."""
    if self._closed:
      return
    self._closed = True
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._close_manager()
      raise _save_error(self.directory, e) from e
    self.manager.close()

  def _close_manager(self) -> None:
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001
      logging.exception("Closing the checkpoint manager of %s failed", self.directory)

  def abort(self) -> None:
    """Close after an error elsewhere: the pending save finishes (or its failure is logged) and
    nothing is raised, so the caller's exception stays the one the user sees."""
    try:
      self.close()
    except Exception:  # noqa: BLE001
      logging.exception("While stopping on an error, the pending checkpoint save failed")

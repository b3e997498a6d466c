"""Encoder-only export for evaluation: parameters, BatchNorm statistics and the model spec.

Layout of an export directory (stable):
  model.json   {"format": "ocl_jax.encoder/1", "model": ModelSpec, "config": training config,
                "digests": {"variables": {array: sha256}, "head": {...}}}
  variables/   Orbax checkpoint of {"params": ..., "batch_stats": ...} of the encoder trunk
  head/        the same for the projector, which ContraCAM's contrastive score needs

`load_model` reads an export or a training workdir's newest checkpoint: every
mode that needs a trained model (eval, ContraCAM, the pipeline, interop) loads it there.
An export's arrays are checked against the digests in its model.json, so a damaged export
is an error naming it and the array, never other weights loaded in silence (exports written
before digests existed load unverified, with a log line).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from ocl_jax import paths
from ocl_jax.checkpointing import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    Checkpointer,
    check_variables,
    digests,
)
from ocl_jax.models import ARCHITECTURES, ContrastiveNet, ModelSpec, ResNet

FORMAT = "ocl_jax.encoder/1"


def export_encoder(
    path: str,
    params: Any,
    batch_stats: Any,
    spec: ModelSpec,
    config: ml_collections.ConfigDict | None = None,
) -> str:
  """Write the encoder trunk of a ContrastiveNet (params['encoder']) to `path`."""
  variables = {
      "params": jax.device_get(params["encoder"]),
      "batch_stats": jax.device_get(batch_stats["encoder"]),
  }
  head = {  # a projector without BatchNorm (proj_batch_norm=False) has no statistics
      "params": jax.device_get(params["projector"]),
      "batch_stats": jax.device_get(batch_stats.get("projector", {})),
  }
  meta = {
      "model": spec.to_dict(),
      "config": json.loads(config.to_json_best_effort()) if config is not None else None,
  }
  return write_export(path, variables, head, meta)


def write_export(path: str, variables: Any, head: Any | None, meta: dict[str, Any]) -> str:
  """An export folder: variables/ (and head/ when given) through Orbax, then model.json with
  `meta`, the format and the arrays' digests, written last and atomically (a folder without
  model.json is no export)."""
  path = paths.resolve(path)
  os.makedirs(path, exist_ok=True)
  parts = {"variables": variables, **({"head": head} if head is not None else {})}
  with ocp.StandardCheckpointer() as ckptr:
    for name, tree in parts.items():
      ckptr.save(os.path.join(path, name), tree, force=True)
  meta = {
      "format": FORMAT,
      **meta,
      "digest_algorithm": "sha256",
      "digests": {name: digests(tree) for name, tree in parts.items()},
  }
  target = os.path.join(path, "model.json")
  tmp = f"{target}.tmp.{os.getpid()}"  # every process of a job writes the same file
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, target)
  return path


def _restore_verified(path: str, part: str, meta: dict[str, Any]) -> Any:
  """Orbax restore of <path>/<part>, its arrays checked against model.json's digests."""
  folder = os.path.join(path, part)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(folder)
  except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
    raise CheckpointCorruptError(
        f"export {path}: {part}/ cannot be read ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); export the model again"
    ) from e
  expected = (meta.get("digests") or {}).get(part)
  if expected is None:
    logging.info("export %s has no digests of %s/ (an older export): loaded unverified", path, part)
    return tree
  got = digests(tree)
  for name, digest in expected.items():
    if got.get(name) != digest:
      raise CheckpointCorruptError(
          f"export {path} is damaged: array {part}/{name} does not match the digest written "
          "with it (a file changed after the export was written); export the model again"
      )
  return tree


def _read_meta(path: str) -> dict[str, Any]:
  meta_path = os.path.join(path, "model.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{path} is not an ocl_jax encoder export (no model.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise CheckpointMismatchError(
        f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}"
    )
  return meta


class LoadedModel(NamedTuple):
  """A model ready for inference (`module.apply(variables, x, train=False)`)."""

  module: ResNet | ContrastiveNet  # the trunk (layer4 map), or with head=True encoder + projector
  variables: dict[str, Any]
  spec: ModelSpec  # with head=True, without predictor (pred_hidden_dim 0)
  meta: dict[str, Any]  # the export's model.json or the checkpoint's metadata
  name: str  # the source folder's name, for results tables


def load_model(source: str, expand_res: int = 1, head: bool = False) -> LoadedModel:
  """The one loader: an export dir (model.json), or a training workdir's newest checkpoint
  (through checkpointing.Checkpointer), else the workdir's export/.

  head=False gives the encoder trunk (evaluation's frozen features); head=True encoder +
  projector as a ContrastiveNet without predictor, the score ContraCAM differentiates.
  """
  source = paths.resolve(source)
  name = os.path.basename(os.path.normpath(source))
  ckpt_dir = os.path.join(source, "checkpoints")
  if os.path.exists(os.path.join(source, "model.json")):
    return _load_export(source, expand_res, head, name)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    return _load_checkpoint(source, expand_res, head, name)
  if os.path.exists(os.path.join(source, "export", "model.json")):
    return _load_export(os.path.join(source, "export"), expand_res, head, name)
  raise FileNotFoundError(
      f"{source} is neither an encoder export (model.json) nor a training "
      "workdir (checkpoints/ or export/)"
  )


def _build(spec: ModelSpec, expand_res: int, head: bool) -> ResNet | ContrastiveNet:
  if head:
    return spec.build(expand_res=expand_res, axis_name=None)
  stages, block = ARCHITECTURES[spec.arch]
  return ResNet(stages, block, spec.width, spec.small_stem, expand_res, axis_name=None)


def _load_export(path: str, expand_res: int, head: bool, name: str) -> LoadedModel:
  meta = _read_meta(path)
  spec = ModelSpec.from_dict(meta["model"], f"{path}/model.json")
  trunk = _restore_verified(path, "variables", meta)
  encoder = _build(spec, expand_res, head=False)
  check_variables(encoder, trunk, f"export {path}")
  if not head:
    return LoadedModel(encoder, trunk, spec, meta, name)
  head_path = os.path.join(path, "head")
  if not os.path.isdir(head_path):
    raise CheckpointMismatchError(_no_head_message(path, meta))
  spec = dataclasses.replace(spec, pred_hidden_dim=0)
  net = _build(spec, expand_res, head=True)
  projector = _restore_verified(path, "head", meta)
  variables = {
      "params": {"encoder": trunk["params"], "projector": projector["params"]},
      "batch_stats": {"encoder": trunk["batch_stats"]},
  }
  if projector.get("batch_stats"):
    variables["batch_stats"]["projector"] = projector["batch_stats"]
  check_variables(net, variables, f"export {path}")
  return LoadedModel(net, variables, spec, meta, name)


def _no_head_message(path: str, meta: dict[str, Any]) -> str:
  """Why an export has no projector: an import names the keys it looked for."""
  imported = meta.get("imported_from")
  if not imported:
    return (
        f"export {path} has no projector (head/); re-export it from a training checkpoint "
        "to run ContraCAM"
    )
  looked = ", ".join(f"{p}*" for p in imported.get("head_prefixes", [])) or "none"
  return (
      f"export {path} has no projector (head/): ContraCAM needs one, and its import from "
      f"{imported.get('source')} found none under {looked} (a projector is Linear-BN-ReLU-"
      "Linear, keys 0/1/3, or Linear-ReLU-Linear, keys 0/2). "
      + " ".join(n for n in imported.get("notes", []) if "projector" in n or "head" in n)
  ).strip()


def _load_checkpoint(workdir: str, expand_res: int, head: bool, name: str) -> LoadedModel:
  ckpt = Checkpointer(workdir)
  try:
    step, meta, state = ckpt.restore_latest()
  finally:
    ckpt.close()
  spec = ModelSpec.from_dict(meta["model"], f"checkpoint {ckpt.directory}/{step}")
  parts = ("encoder", "projector") if head else ("encoder",)
  variables = {
      "params": {k: state["params"][k] for k in parts},
      "batch_stats": {k: state["batch_stats"][k] for k in parts if k in state["batch_stats"]},
  }
  if head:
    spec = dataclasses.replace(spec, pred_hidden_dim=0)
  else:
    variables = {k: v["encoder"] for k, v in variables.items()}
  module = _build(spec, expand_res, head)
  check_variables(module, variables, f"checkpoint {ckpt.directory}/{step}")
  logging.info("Loaded %s step %d (%s)", ckpt.directory, step, spec)
  return LoadedModel(module, variables, spec, meta, name)

"""Encoder-only export for evaluation: parameters, BatchNorm statistics and the model spec.

Layout of an export directory (stable):
  model.json   {"format": "ocl_jax.encoder/1", "model": ModelSpec, "config": training config}
  variables/   Orbax checkpoint of {"params": ..., "batch_stats": ...} of the encoder trunk
  head/        the same for the projector, which ContraCAM's contrastive score needs
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from ocl_jax import paths
from ocl_jax.checkpointing import CheckpointMismatchError, check_variables
from ocl_jax.models import ARCHITECTURES, ContrastiveNet, ModelSpec, ResNet

FORMAT = "ocl_jax.encoder/1"


def export_encoder(path: str, params: Any, batch_stats: Any, spec: ModelSpec,
                   config: ml_collections.ConfigDict | None = None) -> str:
  """Write the encoder trunk of a ContrastiveNet (params['encoder']) to `path`."""
  path = paths.resolve(path)
  os.makedirs(path, exist_ok=True)
  variables = {"params": jax.device_get(params["encoder"]),
               "batch_stats": jax.device_get(batch_stats["encoder"])}
  head = {"params": jax.device_get(params["projector"]),
          "batch_stats": jax.device_get(batch_stats["projector"])}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "variables"), variables, force=True)
    ckptr.save(os.path.join(path, "head"), head, force=True)
  meta = {"format": FORMAT, "model": spec.to_dict(),
          "config": json.loads(config.to_json_best_effort()) if config is not None else None}
  with open(os.path.join(path, "model.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return path


def _read_meta(path: str) -> dict[str, Any]:
  meta_path = os.path.join(path, "model.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{path} is not an ocl_jax encoder export (no model.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise CheckpointMismatchError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


def load_encoder(path: str, expand_res: int = 1) -> tuple[ResNet, dict[str, Any], dict[str, Any]]:
  """(encoder module, variables, metadata) of an export; `module.apply(variables, x, train=False)`
  gives the layer4 feature map."""
  path = paths.resolve(path)
  meta = _read_meta(path)
  spec = ModelSpec(**meta["model"])
  stages, block = ARCHITECTURES[spec.arch]
  module = ResNet(stages, block, spec.width, spec.small_stem, expand_res, axis_name=None)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(path, "variables"))
  check_variables(module, variables, f"export {path}")
  return module, variables, meta


def load_contrastive_net(path: str, expand_res: int = 1) -> tuple[ContrastiveNet, dict[str, Any], ModelSpec]:
  """Encoder + projector of an export as a ContrastiveNet (no predictor), for ContraCAM."""
  path = paths.resolve(path)
  module, trunk, meta = load_encoder(path, expand_res)
  head_path = os.path.join(path, "head")
  if not os.path.isdir(head_path):
    raise CheckpointMismatchError(f"export {path} has no projector (head/); re-export it from a "
                                  "training checkpoint to run ContraCAM")
  spec = dataclasses.replace(ModelSpec(**meta["model"]), pred_hidden_dim=0)
  net = spec.build(expand_res=expand_res, axis_name=None)
  with ocp.StandardCheckpointer() as ckptr:
    head = ckptr.restore(head_path)
  variables = {"params": {"encoder": trunk["params"], "projector": head["params"]},
               "batch_stats": {"encoder": trunk["batch_stats"], "projector": head["batch_stats"]}}
  check_variables(net, variables, f"export {path}")
  return net, variables, spec

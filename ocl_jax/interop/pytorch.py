"""ResNet weights to and from PyTorch / torchvision state dicts.

Why: detection fine-tuning (torchvision, detectron2, mmdet) lives in PyTorch, and most
published self-supervised ResNets (the release, MoCo v2, ...) are PyTorch checkpoints. This
module writes an ocl_jax encoder as a `.safetensors` file in torchvision's ResNet naming and
layouts, and reads such state dicts (or `.pth`/`.pt`/`.ckpt` files when torch is installed)
back: into an ocl_jax `ResNet`, a `ContrastiveNet` with its projector (what ContraCAM
differentiates), or an export that `export.load_model` reads. Which checkpoint layouts are
recognised, and the key naming, are in `interop/layouts.py`.

Every BatchNorm also gets `num_batches_tracked` (int64 0: ocl_jax does not count steps; torch
only reads it when momentum=None). An encoder has no classifier, so there are no `fc.weight` /
`fc.bias`: load with `strict=False` (or drop fc). With `include_head=True` the projector is
written as torch's `fc = nn.Sequential(...)`: `fc.0.weight`, `fc.1.*`, `fc.3.{weight,bias}`
(Linear(no bias)-BN-ReLU-Linear), or without BatchNorm MoCo v2's `fc.0`/`fc.2` (Linear(bias)-
ReLU-Linear); importing reads either back as the projector (`head/`).

torchvision has no small-stem ResNet (3x3 stride-1 conv1, no max-pool) and only width 64:
such models are still written (conv1.weight is then 3x3) and the metadata says there is no
torchvision equivalent; a torch port must replace conv1 and the max-pool (CIFAR-style ResNet)
to use them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from ocl_jax import export as export_lib
from ocl_jax import paths
from ocl_jax.checkpointing import CheckpointMismatchError, check_same_structure, check_variables
from ocl_jax.interop import layouts
from ocl_jax.models import ARCHITECTURES, ContrastiveNet, ModelSpec, ResNet, feature_dim

FORMAT = "ocl_jax.torchvision_resnet/1"
BN_EPS = 1e-5


def _split(variables: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Trunk and projector variables of either a ResNet or a ContrastiveNet variable tree."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  if "encoder" in params:
    trunk = {"params": params["encoder"], "batch_stats": stats["encoder"]}
    head = (  # a projector without BatchNorm has no batch_stats
        {"params": params["projector"], "batch_stats": stats.get("projector", {})}
        if "projector" in params
        else None
    )
    return trunk, head
  return {"params": params, "batch_stats": stats}, None


def to_torchvision_state_dict(
    variables: Mapping[str, Any], head: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
  """torchvision-named float32 arrays (torch layouts) of ResNet trunk variables.

  `variables` is {"params", "batch_stats"} of a `ResNet` (or of a ContrastiveNet,
  whose encoder is taken); `head` (MLPHead variables) adds `fc.0/fc.1/fc.3`, or without
  BatchNorm `fc.0/fc.2`.
  """
  trunk, _ = _split(variables)
  state: dict[str, np.ndarray] = {}
  for key, _, leaf in layouts.keyed_leaves(trunk):
    state[key] = layouts.to_torch(leaf)
  if head is not None:
    for key, _, leaf in layouts.keyed_leaves(head, head=True):
      state[f"fc.{key}"] = layouts.to_torch(leaf)
  for key in list(state):
    if key.endswith(".running_mean"):
      state[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return state


def _torchvision_equivalent(spec: ModelSpec) -> str:
  if spec.small_stem:
    return "none: small stem (3x3 stride-1 conv1, no max-pool); use a CIFAR-style torch ResNet"
  if spec.width != 64:
    return f"none: width {spec.width} (torchvision ResNets have width 64)"
  stages, block = ARCHITECTURES[spec.arch]
  if spec.arch == "resnet10":
    return f"torchvision.models.resnet.ResNet(BasicBlock, {list(stages)})"
  return f"torchvision.models.{spec.arch}()"


def export_torchvision_safetensors(
    source: str | os.PathLike | Mapping[str, Any],
    path: str | os.PathLike,
    spec: ModelSpec | None = None,
    include_head: bool = False,
) -> str:
  """Write an encoder as a torchvision-style `.safetensors` state dict (no `fc.*`).

  `source` is an ocl_jax export directory, or a variable tree (ResNet or
  ContrastiveNet) with its `spec`. `include_head` also writes the projector as
  `fc.0/fc.1/fc.3`, or `fc.0/fc.2` without BatchNorm (module docstring). Returns `path`.
  """
  from safetensors.numpy import save_file

  head = None
  if isinstance(source, (str, os.PathLike)):
    origin = paths.resolve(source)
    if include_head:
      _, variables, spec, _, _ = export_lib.load_model(origin, head=True)
      trunk, head = _split(variables)
    else:
      _, trunk, spec, _, _ = export_lib.load_model(origin)
  else:
    if spec is None:
      raise ValueError(
          "export_torchvision_safetensors: pass `spec` (arch, width, small_stem) "
          "with a variable tree"
      )
    origin = "variables"
    trunk, head = _split(source)
    if include_head and head is None:
      raise ValueError("include_head=True but the variables have no 'projector'")
    if not include_head:
      head = None
  stages, block = ARCHITECTURES[spec.arch]
  check_variables(
      ResNet(stages, block, spec.width, spec.small_stem, axis_name=None),
      trunk,
      f"{origin} (encoder)",
  )
  if head is not None:
    feat = feature_dim(spec.arch, spec.width)
    template = layouts.head_template(
        feat, spec.proj_hidden_dim, spec.proj_dim, spec.proj_batch_norm
    )
    check_same_structure(head, template, f"{origin} (projector)")
  state = to_torchvision_state_dict(trunk, head)
  metadata = {
      "format": "pt",  # tensors are in PyTorch layouts (what HF-style loaders check)
      "ocl_jax_format": FORMAT,
      "arch": spec.arch,
      "width": str(spec.width),
      "small_stem": json.dumps(spec.small_stem),
      "block": block,
      "stage_sizes": json.dumps(list(stages)),
      "torchvision_equivalent": _torchvision_equivalent(spec),
      "classifier": "none (encoder only): load with strict=False or without fc",
      "head": _head_description(spec) if head is not None else "none",
      "bn_eps": str(BN_EPS),
      "bn_momentum": "0.1",
      "source": str(origin),
  }
  path = paths.resolve(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file(state, path, metadata=metadata)
  return path


def _head_description(spec: ModelSpec) -> str:
  feat, hidden, out = feature_dim(spec.arch, spec.width), spec.proj_hidden_dim, spec.proj_dim
  if spec.proj_batch_norm:
    return (
        f"fc.0 Linear({feat}, {hidden}, bias=False), fc.1 BatchNorm1d, fc.2 ReLU, "
        f"fc.3 Linear({hidden}, {out})"
    )
  return f"fc.0 Linear({feat}, {hidden}), fc.1 ReLU, fc.2 Linear({hidden}, {out}) (MoCo v2's)"


# ---------------------------------------------------------------------------
# Reading state dicts.


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  import safetensors
  from safetensors.numpy import load_file

  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such safetensors file")
  try:
    with safetensors.safe_open(path, framework="np") as f:
      metadata = dict(f.metadata() or {})
    return load_file(path), metadata
  except Exception as e:  # SafetensorError for truncated / corrupt files, others for odd dtypes
    raise ValueError(
        f"{path}: cannot read it as safetensors ({type(e).__name__}: {e}); "
        "the file is probably truncated or corrupt"
    ) from e


def _read_torch(path: str) -> Any:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs PyTorch (pip install torch), or convert the state dict "
        "to .safetensors where torch is installed"
    ) from e
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(
        f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: {e}). A PyTorch "
        "Lightning .ckpt can also pickle objects in its hyper-parameters (the release's hold "
        "its augmentation module), which weights_only refuses: where you trust the file and "
        "its code imports, save the state dict alone, torch.save(torch.load(path, "
        "weights_only=False)['state_dict'], 'state_dict.pth'), and import that"
    ) from e

  def to_numpy(v):
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      return (v.float() if v.is_floating_point() else v).numpy()
    if isinstance(v, Mapping):
      return {k: to_numpy(x) for k, x in v.items()}
    return v

  return to_numpy(obj)


def _unwrap(obj: Any, source: str) -> dict[str, np.ndarray]:
  """The state dict inside a checkpoint ({'state_dict': ...} / {'model': ...}), keys as saved."""
  while isinstance(obj, Mapping) and not any(
      isinstance(v, np.ndarray) or hasattr(v, "shape") for v in obj.values()
  ):
    inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      raise CheckpointMismatchError(
          f"{source}: no state dict found (top-level keys {sorted(obj)[:10]})"
      )
    obj = inner
  if not isinstance(obj, Mapping):
    raise CheckpointMismatchError(f"{source}: expected a state dict, got {type(obj).__name__}")
  return {str(k): np.asarray(v) for k, v in obj.items() if hasattr(v, "shape")}


def _infer_arch(state: Mapping[str, np.ndarray], source: str) -> tuple[str, tuple[int, ...], str]:
  counts = []
  for s in range(1, 5):
    idx = {
        int(m.group(1)) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.conv1\.weight$", k))
    }
    counts.append(max(idx) + 1 if idx else 0)
  block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
  for name, (stages, b) in ARCHITECTURES.items():
    if tuple(stages) == tuple(counts) and b == block:
      return name, tuple(counts), block
  raise CheckpointMismatchError(
      f"{source}: blocks per stage {tuple(counts)} with {block} blocks is none of the supported "
      "architectures {"
      + ", ".join(f"{n}: {tuple(s)} {b}" for n, (s, b) in ARCHITECTURES.items())
      + "}"
  )


@dataclasses.dataclass
class ImportedResNet:
  """What a torch state dict holds in ocl_jax terms, and what of it was not used."""

  spec: ModelSpec  # proj_* from the projector when one was found
  module: ResNet
  variables: dict[str, Any]
  head: dict[str, Any] | None  # MLPHead variables (no batch_stats without BatchNorm)
  notes: list[str]
  source: str
  trunk_prefix: str
  head_prefixes: tuple[str, ...]  # where a projector was looked for
  head_prefix: str | None  # where it was found
  unused_keys: list[str]  # besides BatchNorm step counters

  def metadata(self) -> dict[str, Any]:
    """The export's `imported_from` record."""
    return {
        "source": self.source,
        "layout": f"torchvision ResNet under '{self.trunk_prefix}'"
        + (f", projector under '{self.head_prefix}'" if self.head_prefix else ", no projector"),
        "notes": self.notes,
        "has_head": self.head is not None,
        "head_prefixes": list(self.head_prefixes),
        "unused_keys": self.unused_keys,
    }


def _read(
    source: str | os.PathLike | Mapping[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
  if isinstance(source, Mapping):
    return _unwrap(source, "state dict"), {}, "state dict"
  path = paths.resolve(source)
  if path.endswith(".safetensors"):
    state, metadata = _read_safetensors(path)
    return _unwrap(state, path), metadata, path
  return _unwrap(_read_torch(path), path), {}, path


def _import(
    source: str | os.PathLike | Mapping[str, Any],
    arch: str | None,
    width: int | None,
    small_stem: bool | None,
    expand_res: int = 1,
) -> ImportedResNet:
  state, metadata, name = _read(source)
  prefix = layouts.trunk_prefix(state, name)
  trunk = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
  found, counts, block = _infer_arch(trunk, name)
  if arch is not None and arch != found:
    raise CheckpointMismatchError(
        f"{name} holds a {found} ({block} blocks {counts} per stage), not the requested {arch}"
    )
  conv1 = trunk["conv1.weight"]
  if width is None:
    width = int(conv1.shape[0])
  if small_stem is None:
    small_stem = conv1.ndim == 4 and conv1.shape[-1] == 3
  if metadata.get("arch") not in (None, found):
    raise CheckpointMismatchError(
        f"{name}: metadata says arch {metadata['arch']!r}, the keys a {found}"
    )
  module = ResNet(ARCHITECTURES[found][0], block, width, small_stem, expand_res, axis_name=None)
  template = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), np.zeros((2, 64, 64, 3), np.float32), train=False)
  )
  expected = {
      key: (path, layouts.torch_shape(leaf.shape))
      for key, path, leaf in layouts.keyed_leaves(template)
  }
  bn_counters = {
      k[: -len("running_mean")] + layouts.COUNTER for k in expected if k.endswith(".running_mean")
  }
  missing = sorted(set(expected) - set(trunk))
  # Trunk-module keys the architecture does not have mean another architecture; other keys
  # (a classifier or projector `fc`, a queue) are extras, reported as unused.
  extra = sorted(
      k
      for k in set(trunk) - set(expected) - bn_counters
      if k.split(".", 1)[0] in layouts.TRUNK_MODULES
  )
  if missing or extra:
    raise CheckpointMismatchError(
        f"{name} does not fit a {found} (width {width}, small_stem={small_stem}): "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
    )
  variables: dict[str, Any] = {}
  converted = set()
  # conv1 first: its shape tells width and stem, the clearest message when they are wrong.
  for key, (path, shape) in sorted(expected.items(), key=lambda kv: kv[0] != "conv1.weight"):
    value = trunk[key]
    if tuple(value.shape) != shape:
      hint = " (small_stem: 3x3 conv1, standard: 7x7)" if key == "conv1.weight" else ""
      raise CheckpointMismatchError(
          f"{name}: {key} has shape {tuple(value.shape)}, a {found} of width "
          f"{width} (small_stem={small_stem}) expects {shape}{hint}"
      )
    if value.dtype != np.float32:
      converted.add(str(value.dtype))
    layouts.set_path(variables, path, layouts.from_torch(np.asarray(value, np.float32)))
  check_variables(module, variables, name)
  notes = [f"{name}: {found}, width {width}, small_stem={small_stem}, under '{prefix}'"]
  if converted:
    notes.append(f"converted {sorted(converted)} to float32")
  feat = feature_dim(found, width)
  searched = layouts.head_prefixes(prefix)
  head = layouts.import_head(state, searched, feat, notes)
  spec = ModelSpec(
      arch=found,
      width=width,
      small_stem=small_stem,
      proj_hidden_dim=head.hidden if head else feat,
      proj_dim=head.out if head else 128,
      pred_hidden_dim=0,
      proj_batch_norm=head.batch_norm if head else True,
  )
  used = {prefix + k for k in expected} | (head.keys if head else set())
  unused = layouts.unused_keys(state, used)
  for note in notes:
    logging.info("torch import: %s", note)
  if unused:
    logging.warning(
        "torch import: %s: %d keys not used (%s): %s",
        name,
        len(unused),
        layouts.summarise(unused),
        ", ".join(unused),
    )
  return ImportedResNet(
      spec,
      module,
      variables,
      head.variables if head else None,
      notes,
      name,
      prefix,
      searched,
      head.prefix if head else None,
      unused,
  )


def import_torchvision_state_dict(
    source: str | os.PathLike | Mapping[str, Any],
    arch: str | None = None,
    width: int | None = None,
    small_stem: bool | None = None,
    expand_res: int = 1,
) -> tuple[ResNet, dict[str, Any]]:
  """(ResNet, variables) of the backbone in a torchvision-style ResNet state dict.

  `source`: a `.safetensors` file, a `.pth`/`.pt`/`.pth.tar`/`.ckpt` file (needs torch;
  plain, or under 'state_dict'/'model'), or a dict of arrays. The backbone is found under
  the prefixes of `interop/layouts.py` (`module.encoder_q.`, `encoder.`, `backbone.`, ...).
  `arch`, `width` and `small_stem` are inferred from the keys / conv1 when None, and checked
  when given. `module.apply(variables, x, train=False)` gives the layer4 map (NHWC input);
  `import_contrastive_net` adds the projector.
  """
  imported = _import(source, arch, width, small_stem, expand_res)
  return imported.module, imported.variables


def _contrastive_variables(imported: ImportedResNet) -> dict[str, Any]:
  assert imported.head is not None
  variables = {
      "params": {"encoder": imported.variables["params"], "projector": imported.head["params"]},
      "batch_stats": {"encoder": imported.variables["batch_stats"]},
  }
  if imported.head.get("batch_stats"):
    variables["batch_stats"]["projector"] = imported.head["batch_stats"]
  return variables


def import_contrastive_net(
    source: str | os.PathLike | Mapping[str, Any],
    expand_res: int = 1,
    arch: str | None = None,
    width: int | None = None,
    small_stem: bool | None = None,
) -> tuple[ContrastiveNet, dict[str, Any], ModelSpec]:
  """(ContrastiveNet, variables, spec): backbone and projector of a PyTorch checkpoint, in
  memory, for `discovery.contracam` (build-compatible with `contracam.cam_network(spec, ...)`)
  and evaluation.

  `source` and the layouts read as in `import_torchvision_state_dict`; keys not used are
  logged as a warning. A checkpoint without a projector is an error naming the prefixes
  looked for (use `import_torchvision_state_dict` for its backbone alone).
  """
  imported = _import(source, arch, width, small_stem, expand_res)
  if imported.head is None:
    raise CheckpointMismatchError(
        f"{imported.source} has no projector for ContraCAM: looked for "
        + ", ".join(f"{p}*" for p in imported.head_prefixes)
        + " (Linear-BN-ReLU-Linear, keys 0/1/3, or Linear-ReLU-Linear, keys 0/2). "
        + " ".join(n for n in imported.notes if "projector" in n)
        + " import_torchvision_state_dict gives the backbone alone."
    )
  net = imported.spec.build(expand_res=expand_res, axis_name=None)
  variables = _contrastive_variables(imported)
  check_variables(net, variables, imported.source)
  return net, variables, imported.spec


def import_to_export(
    source: str | os.PathLike | Mapping[str, Any],
    export_dir: str | os.PathLike,
    arch: str | None = None,
    width: int | None = None,
    small_stem: bool | None = None,
) -> str:
  """Write a torch ResNet state dict as an ocl_jax encoder export (model.json + variables/,
  and head/ when it holds a projector, so `export.load_model(path, head=True)` gives what
  `import_contrastive_net` does).

  model.json's `imported_from` records the source, the layout, the prefixes where a
  projector was looked for and every key not used. Without a projector the export serves
  evaluation but not ContraCAM.
  """
  imported = _import(source, arch, width, small_stem)
  path = paths.resolve(export_dir)
  head = None
  if imported.head is not None:
    head = {
        "params": imported.head["params"],
        "batch_stats": imported.head.get("batch_stats", {}),
    }
  elif os.path.isdir(os.path.join(path, "head")):
    shutil.rmtree(os.path.join(path, "head"))  # a stale projector of an earlier export
  meta = {
      "model": imported.spec.to_dict(),
      "config": None,
      "imported_from": imported.metadata(),
  }
  export_lib.write_export(path, imported.variables, head, meta)
  logging.info("Wrote the export %s (head/: %s)", path, imported.head is not None)
  return path

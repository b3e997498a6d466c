"""ResNet weights to and from PyTorch / torchvision state dicts.

Why: detection fine-tuning (torchvision, detectron2, mmdet) lives in PyTorch,
and most published self-supervised ResNets (MoCo v2, ...) are PyTorch
checkpoints. This module writes an ocl_jax encoder as a `.safetensors` file in
torchvision's ResNet naming and layouts, and reads such state dicts (or
`.pth`/`.pt` files when torch is installed) back into an ocl_jax `ResNet`, or
into an encoder export that `export.load_model` and ContraCAM read.

Key mapping (ocl_jax path -> torchvision key; conv kernels HWIO <-> OIHW,
dense kernels (in, out) <-> (out, in)):
  conv1/kernel                        conv1.weight
  bn1/{scale,bias}                    bn1.{weight,bias}
  batch_stats bn1/{mean,var}          bn1.{running_mean,running_var}
  layer{s}_{i}/conv{c}, bn{c}         layer{s}.{i}.conv{c}.weight, layer{s}.{i}.bn{c}.*
  layer{s}_{i}/downsample_conv        layer{s}.{i}.downsample.0.weight
  layer{s}_{i}/downsample_bn          layer{s}.{i}.downsample.1.*
Every BatchNorm also gets `num_batches_tracked` (int64 0: ocl_jax does not count
steps; torch only reads it when momentum=None). An encoder has no classifier,
so there are no `fc.weight` / `fc.bias`: load with `strict=False` (or drop fc).
With `include_head=True` the projector (ocl_jax MLPHead, Linear(no bias)-BN-
ReLU-Linear) is written as torch's `fc = nn.Sequential(Linear, BatchNorm1d,
ReLU, Linear)`: `fc.0.weight`, `fc.1.*`, `fc.3.{weight,bias}`; importing reads
that layout back as the ContraCAM projector (`head/`). MoCo v2's projector
(`fc.0` Linear with bias, ReLU, `fc.2`) has no BN, so it does not map onto
MLPHead exactly and is skipped with a note; an export without `head/` still
serves linear eval / kNN / detection, but ContraCAM needs a projector.

torchvision has no small-stem ResNet (3x3 stride-1 conv1, no max-pool) and
only width 64: such models are still written (conv1.weight is then 3x3) and the
metadata says there is no torchvision equivalent; a torch port must replace
conv1 and the max-pool (CIFAR-style ResNet) to use them.
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
import orbax.checkpoint as ocp

from ocl_jax import export as export_lib
from ocl_jax import paths
from ocl_jax.checkpointing import CheckpointMismatchError, check_same_structure, check_variables
from ocl_jax.models import ARCHITECTURES, MLPHead, ModelSpec, ResNet, feature_dim

FORMAT = "ocl_jax.torchvision_resnet/1"
BN_EPS = 1e-5
# Prefixes wrapping a backbone in common checkpoints (DataParallel, MoCo, detection
# backbones, SimCLR-style wrappers), stripped in this order.
PREFIXES = ("module.", "encoder_q.", "backbone.", "encoder.")
_HEAD_KEYS = {
    "fc.0.weight",
    "fc.1.weight",
    "fc.1.bias",
    "fc.1.running_mean",
    "fc.1.running_var",
    "fc.3.weight",
    "fc.3.bias",
}


# ---------------------------------------------------------------------------
# Naming and layouts.


def _module_name(path: tuple[str, ...]) -> str:
  """ocl_jax module path -> torchvision module name: ('layer1_0', 'downsample_bn') ->
  'layer1.0.downsample.1'."""
  parts = []
  for p in path:
    m = re.fullmatch(r"layer(\d)_(\d+)", p)
    if m:
      parts += [f"layer{m.group(1)}", m.group(2)]
    elif p == "downsample_conv":
      parts += ["downsample", "0"]
    elif p == "downsample_bn":
      parts += ["downsample", "1"]
    else:
      parts.append(p)
  return ".".join(parts)


_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_HEAD_MODULES = {"fc1": "fc.0", "bn1": "fc.1", "fc2": "fc.3"}


def _keyed_leaves(variables: Mapping[str, Any], head: bool = False):
  """(torch key, ocl_jax path, leaf) for every array of trunk (or MLPHead) variables."""
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]
    for path, leaf in flat:
      names = tuple(getattr(k, "key", str(k)) for k in path)
      module = _HEAD_MODULES[names[0]] if head else _module_name(names[:-1])
      yield f"{module}.{_LEAF[collection, names[-1]]}", (collection, *names), leaf


def _to_torch(value: Any) -> np.ndarray:
  """HWIO conv kernel -> OIHW, (in, out) dense kernel -> (out, in); vectors unchanged."""
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)
  elif value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def _from_torch(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _head_template(feat: int, hidden: int, out: int) -> Any:
  return jax.eval_shape(
      lambda: MLPHead(hidden, out, axis_name=None).init(
          jax.random.PRNGKey(0), np.zeros((2, feat), np.float32), train=False
      )
  )


def _split(variables: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Trunk and projector variables of either a ResNet or a ContrastiveNet variable tree."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  if "encoder" in params:
    trunk = {"params": params["encoder"], "batch_stats": stats["encoder"]}
    head = (
        {"params": params["projector"], "batch_stats": stats["projector"]}
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
  whose encoder is taken); `head` (MLPHead variables) adds `fc.0/fc.1/fc.3`.
  """
  trunk, _ = _split(variables)
  state: dict[str, np.ndarray] = {}
  for key, _, leaf in _keyed_leaves(trunk):
    state[key] = _to_torch(leaf)
  if head is not None:
    for key, _, leaf in _keyed_leaves(head, head=True):
      state[key] = _to_torch(leaf)
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
  `fc.0/fc.1/fc.3` (module docstring). Returns `path`.
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
    check_same_structure(
        head,
        _head_template(feature_dim(spec.arch, spec.width), spec.proj_hidden_dim, spec.proj_dim),
        f"{origin} (projector)",
    )
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
      "head": (
          f"fc.0 Linear({feature_dim(spec.arch, spec.width)}, {spec.proj_hidden_dim}, bias=False), "
          f"fc.1 BatchNorm1d, fc.2 ReLU, fc.3 Linear(.., {spec.proj_dim})"
      )
      if head is not None
      else "none",
      "bn_eps": str(BN_EPS),
      "bn_momentum": "0.1",
      "source": str(origin),
  }
  path = paths.resolve(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file(state, path, metadata=metadata)
  return path


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
        f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: {e})"
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
  """The state dict inside a checkpoint ({'state_dict': ...} / {'model': ...}), unprefixed."""
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
  state = {str(k): v for k, v in obj.items() if hasattr(v, "shape")}
  for prefix in PREFIXES:
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix) :]: v for k, v in state.items()}
    elif "conv1.weight" not in state and prefix + "conv1.weight" in state:
      # A checkpoint of several networks (MoCo: encoder_q, encoder_k, queue): take the
      # backbone under `prefix` (MoCo's query encoder, as its linear evaluation does).
      dropped = sorted(k for k in state if not k.startswith(prefix))
      logging.info(
          "%s: using the '%s' weights, ignoring %d other entries (e.g. %s)",
          source,
          prefix,
          len(dropped),
          dropped[:3],
      )
      state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
  return {k: np.asarray(v) for k, v in state.items()}


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
  """What a torch state dict holds in ocl_jax terms."""

  spec: ModelSpec
  module: ResNet
  variables: dict[str, Any]
  head: dict[str, Any] | None
  notes: list[str]


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


def _import_head(
    fc: dict[str, np.ndarray], feat: int, source: str, notes: list[str]
) -> tuple[dict[str, Any] | None, int, int]:
  """MLPHead variables from `fc.0/fc.1/fc.3` when exactly Linear(no bias)-BN-ReLU-Linear."""
  keys = set(fc) - {"fc.1.num_batches_tracked"}
  if not fc:
    return None, 0, 0
  if keys == _HEAD_KEYS:
    hidden, out = fc["fc.0.weight"].shape[0], fc["fc.3.weight"].shape[0]
    expected = {
        "fc.0.weight": (hidden, feat),
        "fc.1.weight": (hidden,),
        "fc.1.bias": (hidden,),
        "fc.1.running_mean": (hidden,),
        "fc.1.running_var": (hidden,),
        "fc.3.weight": (out, hidden),
        "fc.3.bias": (out,),
    }
    bad = [f"{k} {fc[k].shape} (expected {s})" for k, s in expected.items() if fc[k].shape != s]
    if not bad:
      head: dict[str, Any] = {}
      for key, path, _ in _keyed_leaves(_head_template(feat, hidden, out), head=True):
        _set(head, path, _from_torch(np.asarray(fc[key], np.float32)))
      notes.append(f"imported fc.0/fc.1/fc.3 as the projector MLPHead({feat}->{hidden}->{out})")
      return head, hidden, out
    notes.append(
        f"fc.* looks like Linear-BN-ReLU-Linear but shapes do not fit: {bad}; not imported"
    )
  elif {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"} <= keys:
    notes.append(
        "ignored fc.0/fc.2: MoCo v2's projector is Linear(bias)-ReLU-Linear and ocl_jax's "
        "MLPHead is Linear(no bias)-BN-ReLU-Linear, so it does not map exactly; no projector "
        "(ContraCAM needs one)"
    )
  else:
    notes.append(f"ignored the classifier / head keys {sorted(fc)[:6]}")
  return None, 0, 0


def _import(
    source: str | os.PathLike | Mapping[str, Any],
    arch: str | None,
    width: int | None,
    small_stem: bool | None,
    expand_res: int = 1,
) -> ImportedResNet:
  state, metadata, name = _read(source)
  if "conv1.weight" not in state:
    raise CheckpointMismatchError(
        f"{name}: no 'conv1.weight' (after stripping prefixes {PREFIXES}); not a torchvision "
        f"ResNet state dict (first keys {sorted(state)[:5]})"
    )
  found, counts, block = _infer_arch(state, name)
  if arch is not None and arch != found:
    raise CheckpointMismatchError(
        f"{name} holds a {found} ({block} blocks {counts} per stage), not the requested {arch}"
    )
  conv1 = state["conv1.weight"]
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
  expected = {key: (path, _torch_shape(leaf.shape)) for key, path, leaf in _keyed_leaves(template)}
  bn_counters = {
      k[: -len("running_mean")] + "num_batches_tracked"
      for k in expected
      if k.endswith(".running_mean")
  }
  missing = sorted(set(expected) - set(state))
  fc = {k: v for k, v in state.items() if k.startswith("fc.")}
  extra = sorted(set(state) - set(expected) - bn_counters - set(fc))
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
    value = state[key]
    if tuple(value.shape) != shape:
      hint = " (small_stem: 3x3 conv1, standard: 7x7)" if key == "conv1.weight" else ""
      raise CheckpointMismatchError(
          f"{name}: {key} has shape {tuple(value.shape)}, a {found} of width "
          f"{width} (small_stem={small_stem}) expects {shape}{hint}"
      )
    if value.dtype != np.float32:
      converted.add(str(value.dtype))
    _set(variables, path, _from_torch(np.asarray(value, np.float32)))
  notes = [f"{name}: {found}, width {width}, small_stem={small_stem}"]
  if converted:
    notes.append(f"converted {sorted(converted)} to float32")
  head, hidden, out = _import_head(fc, feature_dim(found, width), name, notes)
  spec = ModelSpec(
      arch=found,
      width=width,
      small_stem=small_stem,
      proj_hidden_dim=hidden or feature_dim(found, width),
      proj_dim=out or 128,
      pred_hidden_dim=0,
  )
  check_variables(module, variables, name)
  for note in notes:
    logging.info("torch import: %s", note)
  return ImportedResNet(spec, module, variables, head, notes)


def import_torchvision_state_dict(
    source: str | os.PathLike | Mapping[str, Any],
    arch: str | None = None,
    width: int | None = None,
    small_stem: bool | None = None,
    expand_res: int = 1,
) -> tuple[ResNet, dict[str, Any]]:
  """(ResNet, variables) from a torchvision-style ResNet state dict.

  `source`: a `.safetensors` file, a `.pth`/`.pt`/`.pth.tar` file (needs torch;
  plain, or under 'state_dict'/'model'), or a dict of arrays. Prefixes
  `module.`/`encoder_q.`/`backbone.`/`encoder.` are stripped. `arch`, `width`
  and `small_stem` are inferred from the keys / conv1 when None, and checked
  when given. `fc.*` is ignored (logged). `module.apply(variables, x, train=False)`
  gives the layer4 map (NHWC input).
  """
  imported = _import(source, arch, width, small_stem, expand_res)
  return imported.module, imported.variables


def import_to_export(
    source: str | os.PathLike | Mapping[str, Any],
    export_dir: str | os.PathLike,
    arch: str | None = None,
    width: int | None = None,
    small_stem: bool | None = None,
) -> str:
  """Write a torch ResNet state dict as an ocl_jax encoder export (model.json + variables/).

  `head/` is written only when the state dict carries an exact MLPHead projector
  (`fc.0/fc.1/fc.3`); without it the export serves evaluation but not ContraCAM.
  """
  imported = _import(source, arch, width, small_stem)
  path = paths.resolve(export_dir)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "variables"), imported.variables, force=True)
    if imported.head is not None:
      ckptr.save(os.path.join(path, "head"), imported.head, force=True)
  if imported.head is None and os.path.isdir(os.path.join(path, "head")):
    shutil.rmtree(os.path.join(path, "head"))  # a stale projector of an earlier export
  origin = "state dict" if isinstance(source, Mapping) else paths.resolve(source)
  meta = {
      "format": export_lib.FORMAT,
      "model": imported.spec.to_dict(),
      "config": None,
      "imported_from": {
          "source": origin,
          "layout": "torchvision ResNet state dict",
          "notes": imported.notes,
          "has_head": imported.head is not None,
      },
  }
  with open(os.path.join(path, "model.json"), "w") as f:
    json.dump(meta, f, indent=2)
  logging.info("Wrote the export %s (head/: %s)", path, imported.head is not None)
  return path

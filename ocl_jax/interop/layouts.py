"""Key layouts of PyTorch ResNet checkpoints: the torch names of ocl_jax variables, and where
a published checkpoint keeps its backbone and its projector.

Why: self-supervised checkpoints wrap the same torchvision ResNet in different modules, and
ContraCAM needs the projector as well as the backbone. Recognised layouts:

  backbone   `<P>conv1.weight`, `<P>layer*`, with P the first of TRUNK_PREFIXES present:
             '' (torchvision), 'encoder_q.' (MoCo v1/v2), 'encoder.' (the release's Lightning
             checkpoints), 'backbone.' (detection, solo-learn), 'base_encoder.' (MoCo v3),
             'online_network.encoder.' (pl_bolts BYOL), each also under 'module.'
             (DataParallel); else the one other prefix that holds a ResNet.
  projector  `<P>fc.*` (MoCo v2, ocl_jax's own safetensors), else `<R>projector.*`, R being
             P's parent (the release, solo-learn, pl_bolts BYOL; one wrapper module such as
             `model.` inside it is looked through), as a torch nn.Sequential:
               0 Linear(no bias), 1 BatchNorm1d, 3 Linear   MLPHead (the release, ocl_jax)
               0 Linear(bias), 1 BatchNorm1d, 3 Linear      MLPHead; the bias is folded into
                                                            BN's running mean (BN removes it)
               0 Linear(bias), 2 Linear                     MLPHead(batch_norm=False), MoCo v2's
Every other key (momentum encoders, queues, predictors, classifiers) is not used, and listed.

Naming (ocl_jax path -> torch key; conv kernels HWIO <-> OIHW, dense kernels (in, out) <->
(out, in)): conv1/kernel -> conv1.weight, bn1/{scale,bias} -> bn1.{weight,bias}, batch_stats
bn1/{mean,var} -> bn1.{running_mean,running_var}, layer{s}_{i}/conv{c} -> layer{s}.{i}.conv{c},
layer{s}_{i}/downsample_{conv,bn} -> layer{s}.{i}.downsample.{0,1}; MLPHead fc1, bn1, fc2 ->
0, 1, 3 (without BatchNorm fc1, fc2 -> 0, 2).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from ocl_jax.checkpointing import CheckpointMismatchError
from ocl_jax.models import MLPHead

TRUNK_PREFIXES = tuple(
    wrapper + net
    for net in (
        "",
        "encoder_q.",
        "encoder.",
        "backbone.",
        "base_encoder.",
        "online_network.encoder.",
    )
    for wrapper in ("", "module.")
)
# First key components of a torchvision ResNet trunk: such keys that the architecture does not
# expect mean another architecture (an error), not an unused extra.
TRUNK_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
COUNTER = "num_batches_tracked"


# ---------------------------------------------------------------------------
# Naming and tensor layouts.


def module_name(path: tuple[str, ...]) -> str:
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


LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def head_modules(batch_norm: bool) -> dict[str, str]:
  """MLPHead module -> its index in the torch nn.Sequential."""
  return {"fc1": "0", "bn1": "1", "fc2": "3"} if batch_norm else {"fc1": "0", "fc2": "2"}


def head_batch_norm(head: Mapping[str, Any]) -> bool:
  """Whether MLPHead variables are of the BatchNorm variant."""
  return "bn1" in head["params"]


def keyed_leaves(
    variables: Mapping[str, Any], head: bool = False
) -> Iterator[tuple[str, tuple[str, ...], Any]]:
  """(torch key, ocl_jax path, leaf) for every array of trunk (or MLPHead) variables; head
  keys are relative to the projector ('0.weight')."""
  modules = head_modules(head_batch_norm(variables)) if head else None
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]
    for path, leaf in flat:
      names = tuple(getattr(k, "key", str(k)) for k in path)
      module = modules[names[0]] if head else module_name(names[:-1])
      yield f"{module}.{LEAF[collection, names[-1]]}", (collection, *names), leaf


def to_torch(value: Any) -> np.ndarray:
  """HWIO conv kernel -> OIHW, (in, out) dense kernel -> (out, in); vectors unchanged."""
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)
  elif value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def from_torch(value: np.ndarray) -> np.ndarray:
  """The inverse of to_torch."""
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of an ocl_jax array of `shape` (to_torch's transposition)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def head_template(feat: int, hidden: int, out: int, batch_norm: bool = True) -> Any:
  """Shapes of MLPHead(hidden, out, batch_norm) variables on `feat` inputs."""
  return jax.eval_shape(
      lambda: MLPHead(hidden, out, axis_name=None, batch_norm=batch_norm).init(
          jax.random.PRNGKey(0), np.zeros((2, feat), np.float32), train=False
      )
  )


# ---------------------------------------------------------------------------
# Where the backbone and the projector are.


def trunk_prefix(state: Mapping[str, Any], source: str) -> str:
  """The prefix of the ResNet whose weights to import (module docstring)."""
  for prefix in TRUNK_PREFIXES:
    if prefix + "conv1.weight" in state:
      return prefix
  others = sorted(
      k[: -len("conv1.weight")]
      for k in state
      if k.endswith("conv1.weight") and k[: -len("conv1.weight")] + "layer1.0.conv1.weight" in state
  )
  if len(others) == 1:
    return others[0]
  if others:
    raise CheckpointMismatchError(
        f"{source} holds several ResNets, under {others}: pass a state dict of the one to import "
        "(its keys without the prefix)"
    )
  raise CheckpointMismatchError(
      f"{source}: no 'conv1.weight' under any of the prefixes {list(TRUNK_PREFIXES)}; not a "
      f"torchvision ResNet state dict (first keys {sorted(state)[:5]})"
  )


def head_prefixes(prefix: str) -> tuple[str, ...]:
  """Where a projector is looked for, in order, given the backbone's prefix."""
  parent = prefix.rstrip(".").rpartition(".")[0]
  return (f"{prefix}fc.", f"{parent}.projector." if parent else "projector.")


@dataclasses.dataclass(frozen=True)
class ImportedHead:
  """A projector found in a state dict, as MLPHead variables."""

  variables: dict[str, Any]
  hidden: int
  out: int
  batch_norm: bool
  prefix: str  # where it was found, with a wrapper looked through ('...projector.model.')
  keys: frozenset[str]  # the state-dict keys it used


def _under(state: Mapping[str, Any], prefix: str) -> tuple[str, dict[str, Any]]:
  """(prefix, keys under it made relative), looking through one wrapper module ('model.')."""
  rel = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
  heads = {k.split(".", 1)[0] for k in rel}
  if len(heads) == 1 and not next(iter(heads)).isdigit() and all("." in k for k in rel):
    wrapper = next(iter(heads)) + "."
    return prefix + wrapper, {k[len(wrapper) :]: v for k, v in rel.items()}
  return prefix, rel


_BN_HEAD = {
    "0.weight",
    "1.weight",
    "1.bias",
    "1.running_mean",
    "1.running_var",
    "3.weight",
    "3.bias",
}
_PLAIN_HEAD = {"0.weight", "0.bias", "2.weight", "2.bias"}


def _head_at(
    state: Mapping[str, Any], prefix: str, feat: int, notes: list[str]
) -> ImportedHead | None:
  prefix, rel = _under(state, prefix)
  keys = {k for k in rel if not k.endswith(COUNTER)}
  if keys in (_BN_HEAD, _BN_HEAD | {"0.bias"}):
    batch_norm, last = True, "3"
  elif keys == _PLAIN_HEAD:
    batch_norm, last = False, "2"
  else:
    notes.append(
        f"{prefix}* ({sorted(rel)[:8]}) fits no projector layout (0 Linear, 1 BatchNorm1d, "
        "3 Linear; or 0 Linear, 2 Linear): not imported"
    )
    return None
  hidden, out = rel["0.weight"].shape[0], rel[f"{last}.weight"].shape[0]
  expected = {"0.weight": (hidden, feat), f"{last}.weight": (out, hidden), f"{last}.bias": (out,)}
  expected.update({k: (hidden,) for k in keys if k[0] in "01" and k != "0.weight"})
  bad = [
      f"{prefix}{k} {tuple(rel[k].shape)} (expected {s})"
      for k, s in expected.items()
      if tuple(rel[k].shape) != s
  ]
  if bad:
    notes.append(
        f"{prefix}* looks like a projector but does not fit the backbone: {bad}; not imported"
    )
    return None
  arrays = {k: np.asarray(rel[k], np.float32) for k in keys}
  kind = "Linear(no bias)-BN-ReLU-Linear"
  if batch_norm and "0.bias" in keys:  # BN(xW + b) = BN'(xW) with running mean - b
    arrays["1.running_mean"] = arrays["1.running_mean"] - arrays.pop("0.bias")
    kind = "Linear(bias)-BN-ReLU-Linear, the first bias folded into the BN running mean"
  elif not batch_norm:
    kind = "Linear(bias)-ReLU-Linear (MoCo v2's; proj_batch_norm=False)"
  head: dict[str, Any] = {}
  for key, path, _ in keyed_leaves(head_template(feat, hidden, out, batch_norm), head=True):
    set_path(head, path, from_torch(arrays[key]))
  notes.append(f"projector {prefix}*: {kind}, {feat} -> {hidden} -> {out}")
  used = frozenset(k for k in state if k.startswith(prefix))
  return ImportedHead(head, int(hidden), int(out), batch_norm, prefix, used)


def import_head(
    state: Mapping[str, Any], prefixes: tuple[str, ...], feat: int, notes: list[str]
) -> ImportedHead | None:
  """The first projector found under `prefixes` (module docstring), or None; `notes` says why
  none fits where keys exist."""
  for prefix in prefixes:
    if any(k.startswith(prefix) for k in state):
      head = _head_at(state, prefix, feat, notes)
      if head is not None:
        return head
  if not any(any(k.startswith(p) for k in state) for p in prefixes):
    notes.append(f"no projector: no keys under {', '.join(p + '*' for p in prefixes)}")
  return None


def unused_keys(state: Mapping[str, Any], used: set[str] | frozenset[str]) -> list[str]:
  """The keys of `state` not imported, BatchNorm step counters aside."""
  return sorted(k for k in state if k not in used and not k.endswith(COUNTER))


def summarise(keys: list[str]) -> str:
  """'module.encoder_k.* (122 keys), module.queue': keys grouped by their first component."""
  groups: dict[str, list[str]] = collections.defaultdict(list)
  for k in keys:
    head, _, rest = k.partition(".")
    if head == "module" and rest:
      head = "module." + rest.partition(".")[0]
    groups[head].append(k)
  return ", ".join(
      v[0] if len(v) == 1 else f"{g}.* ({len(v)} keys)" for g, v in sorted(groups.items())
  )

"""Plain-PyTorch reference of the benchmarked work, for `ocl_jax.tools.bench` (optional extra).

Why: a JAX timing on a CPU means little alone; the same network, batch and
step written the usual PyTorch way (eager, NCHW, `loss.backward()`,
`torch.optim.SGD`), timed in the same run, gives the ratio that does.

- `ContrastiveNet`: ResNet-10/18/34/50 (standard or small stem, `expand_res`)
  plus the projector / predictor MLPs, the architecture of `ocl_jax.models`.
  Module names follow torchvision (`conv1`, `layer1.0.bn2`, `fc.0` ...), so
  `interop.pytorch.to_torchvision_state_dict` loads an ocl_jax model into it.
- `TrainStep`: one MoCo v2 / BYOL / SimCLR step on two ready views, as the
  official MoCo code does it (augmentation happens elsewhere, in data workers).
- `contracam`: ContraCAM as the official release computes it: each of the T
  iterations forwards the masked batch, scores it contrastively, calls
  `loss.backward()` through the whole network (parameters require grad) and
  reads the layer4 activations and gradients (Grad-CAM, positive weights).

Only import this module when torch is installed (`pip install ".[reference]"`).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

import torch
from torch import nn
import torch.nn.functional as F

from ocl_jax.models import ARCHITECTURES, block_stride, feature_dim


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_ch: int, filters: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, filters, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(filters)
    nn.init.zeros_(self.bn2.weight)  # zero-init of the last BN gamma (docs/method.md#pretraining)
    self.downsample = None
    if stride != 1 or in_ch != filters:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_ch, filters, 1, stride, bias=False), nn.BatchNorm2d(filters)
      )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_ch: int, filters: int, stride: int):
    super().__init__()
    out = filters * self.expansion
    self.conv1 = nn.Conv2d(in_ch, filters, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
    self.bn2 = nn.BatchNorm2d(filters)
    self.conv3 = nn.Conv2d(filters, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    nn.init.zeros_(self.bn3.weight)
    self.downsample = None
    if stride != 1 or in_ch != out:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_ch, out, 1, stride, bias=False), nn.BatchNorm2d(out)
      )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class ResNet(nn.Module):
  """The trunk up to layer4, NCHW; `expand_res` 2 (4) runs layer4's (and layer3's) first
  block with stride 1, as `ocl_jax.models.ResNet`."""

  def __init__(
      self,
      stage_sizes: Sequence[int],
      block: str = "basic",
      width: int = 64,
      small_stem: bool = False,
      expand_res: int = 1,
  ):
    super().__init__()
    self.small_stem = small_stem
    if small_stem:
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    cls = BasicBlock if block == "basic" else Bottleneck
    in_ch = width
    for stage, n in enumerate(stage_sizes):
      blocks = []
      for b in range(n):
        stride = block_stride(stage, b, expand_res)
        blocks.append(cls(in_ch, width * 2**stage, stride))
        in_ch = width * 2**stage * cls.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(x)))
    if not self.small_stem:
      x = F.max_pool2d(x, 3, 2, 1)
    for stage in range(self.num_stages):
      x = getattr(self, f"layer{stage + 1}")(x)
    return x


def mlp_head(in_dim: int, hidden: int, out: int) -> nn.Sequential:
  """Linear(no bias)-BN-ReLU-Linear (fc.0, fc.1, fc.3 in torchvision naming)."""
  return nn.Sequential(
      nn.Linear(in_dim, hidden, bias=False),
      nn.BatchNorm1d(hidden),
      nn.ReLU(inplace=True),
      nn.Linear(hidden, out),
  )


class ContrastiveNet(nn.Module):
  """Encoder + projector (+ predictor): `ocl_jax.models.ContrastiveNet` in PyTorch.

  The trunk's parameters sit at the top level (torchvision names) and the
  projector is `fc`, so an ocl_jax state dict from `interop.pytorch` loads as is.
  """

  def __init__(
      self,
      arch: str = "resnet18",
      width: int = 64,
      small_stem: bool = False,
      proj_hidden_dim: int = 0,
      proj_dim: int = 128,
      pred_hidden_dim: int = 0,
      expand_res: int = 1,
  ):
    super().__init__()
    stages, block = ARCHITECTURES[arch]
    self.trunk = ResNet(stages, block, width, small_stem, expand_res)
    d = feature_dim(arch, width)
    self.fc = mlp_head(d, proj_hidden_dim or d, proj_dim)
    self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim) if pred_hidden_dim else None

  def load_ocl_state_dict(self, state: dict) -> None:
    """Load torchvision-named arrays (`interop.pytorch.to_torchvision_state_dict` with a head)."""
    tensors = {k: torch.tensor(np.asarray(v)) for k, v in state.items()}
    trunk = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
    head = {k[3:]: v for k, v in tensors.items() if k.startswith("fc.")}
    self.trunk.load_state_dict(trunk)
    self.fc.load_state_dict(head, strict=False)

  def feature_map(self, x: torch.Tensor) -> torch.Tensor:
    return self.trunk(x)

  def embed_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
    return F.normalize(self.fc(fmap.mean(dim=(2, 3))), dim=1)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    fmap = self.trunk(x)
    features = fmap.mean(dim=(2, 3))
    z = F.normalize(self.fc(features), dim=1)
    out = {"features": features, "embedding": z}
    if self.predictor is not None:
      out["prediction"] = F.normalize(self.predictor(z), dim=1)
    return out


class TrainStep:
  """One contrastive step on two views, eager PyTorch; MoCo as the official MoCo v2 code
  (key encoder EMA before the key forward, queue of keys), BYOL and SimCLR alike.

  Call with NCHW float32 views; returns the loss tensor (no host sync of its own).
  """

  def __init__(
      self,
      method: str,
      net: ContrastiveNet,
      lr: float = 0.03,
      momentum: float = 0.9,
      weight_decay: float = 1e-4,
      temperature: float = 0.2,
      ema: float = 0.99,
      queue_size: int = 1024,
  ):
    if method not in ("moco", "byol", "simclr"):
      raise ValueError(f"method must be moco, byol or simclr, got {method!r}")
    self.method, self.net, self.temperature, self.ema = method, net, temperature, ema
    net.train()
    self.target = None
    if method in ("moco", "byol"):
      self.target = copy.deepcopy(net)
      self.target.predictor = None
      for p in self.target.parameters():
        p.requires_grad_(False)
    self.opt = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    if method == "moco":
      dim = net.fc[-1].out_features
      self.queue = F.normalize(torch.randn(queue_size, dim), dim=1)
      self.ptr = 0

  @torch.no_grad()
  def _ema_update(self) -> None:
    online = dict(self.net.named_parameters())
    for name, t in self.target.named_parameters():
      t.mul_(self.ema).add_(online[name].detach(), alpha=1.0 - self.ema)

  def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    if self.method == "moco":
      q = self.net(x1)["embedding"]
      with torch.no_grad():
        self._ema_update()
        k = self.target(x2)["embedding"]
      logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], 1) / self.temperature
      loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))
    elif self.method == "byol":
      p1, p2 = self.net(x1)["prediction"], self.net(x2)["prediction"]
      with torch.no_grad():
        self._ema_update()
        y1, y2 = self.target(x1)["embedding"], self.target(x2)["embedding"]
      loss = (-2 * ((p1 * y2).sum(1) + (p2 * y1).sum(1))).mean()
    else:
      z = torch.cat([self.net(x1)["embedding"], self.net(x2)["embedding"]])
      n = z.shape[0] // 2
      sim = (z @ z.T) / self.temperature
      sim.fill_diagonal_(float("-inf"))
      target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
      loss = F.cross_entropy(sim, target)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    if self.method == "moco":
      with torch.no_grad():
        b = k.shape[0]
        self.queue[self.ptr : self.ptr + b] = k
        self.ptr = (self.ptr + b) % self.queue.shape[0]
    return loss.detach()


def build_net(
    arch: str,
    width: int,
    small_stem: bool,
    proj_hidden_dim: int = 0,
    proj_dim: int = 128,
    pred_hidden_dim: int = 0,
    expand_res: int = 1,
    seed: int = 0,
) -> ContrastiveNet:
  """A freshly initialised reference network (seeded; PyTorch's default init, as ocl_jax)."""
  torch.manual_seed(seed)
  return ContrastiveNet(
      arch, width, small_stem, proj_hidden_dim, proj_dim, pred_hidden_dim, expand_res
  )


def _contrastive_score(
    q: torch.Tensor, key: torch.Tensor, negatives: list[torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
  """score_i = q_i.k_i/tau - log sum over every set s and j != i of exp(q_i.n_sj/tau)."""
  b = q.shape[0]
  pos = (q * key).sum(1) / temperature
  neg = torch.stack([q @ n.T for n in negatives], 1) / temperature  # (B, S, B)
  self_pair = torch.eye(b, dtype=torch.bool)[:, None, :]
  neg = neg.masked_fill(self_pair, float("-inf"))
  return pos - torch.logsumexp(neg.reshape(b, -1), dim=1)


def contracam(
    net: ContrastiveNet,
    images: torch.Tensor,
    iterations: int = 10,
    temperature: float = 1.0,
    eps: float = 1e-20,
) -> torch.Tensor:
  """ContraCAM union masks (B, H, W) of normalised NCHW `images`, as the official code.

  Per iteration: forward the masked batch (eval-mode BN), take the layer4 map
  and its gradient of the summed score via `loss.backward()` (which also
  fills every parameter's .grad, as the release does), weight channels by
  max(0, mean gradient), ReLU, bicubic upsampling, per-image min-max, union.
  `net` must be built with the wanted `expand_res`.
  """
  net.eval()
  b, _, h, w = images.shape
  colour = images.mean(dim=(0, 2, 3), keepdim=True)
  union = torch.zeros(b, h, w)
  x, key, negatives = images, None, []
  for _ in range(iterations):
    fmap = net.feature_map(x)
    fmap.retain_grad()
    q = net.embed_from_map(fmap)
    if key is None:
      key = q.detach()
    negatives.append(q.detach())
    score = _contrastive_score(q, key, negatives, temperature)
    net.zero_grad(set_to_none=True)
    score.sum().backward()
    with torch.no_grad():
      weights = fmap.grad.mean(dim=(2, 3)).clamp(min=0)
      cam = F.relu((weights[:, :, None, None] * fmap).sum(1))
      cam = F.interpolate(cam[:, None], size=(h, w), mode="bicubic", align_corners=False)[:, 0]
      cam = cam - cam.amin(dim=(1, 2), keepdim=True)
      cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + eps)
      union = torch.maximum(union, cam)
      m = union[:, None]
      x = images * (1 - m) + colour * m
  return union

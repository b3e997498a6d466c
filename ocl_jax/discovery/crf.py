"""Dense-CRF refinement of a foreground map in NumPy: the release's `--apply_crf`.

docs/method.md#boxes-and-masks. A fully connected CRF (Krähenbühl & Koltun 2011) over two
labels (foreground, background), solved by mean field the way pydensecrf does it: unary
-log(p + 1e-20), a Gaussian kernel on pixel position and a bilateral kernel on position and
RGB, Potts compatibility, each kernel normalised symmetrically (D^-1/2 K D^-1/2, D = K 1,
the pixel's own weight included). Filtering a map with a kernel is either

- 'lattice': the permutohedral lattice of Adams, Baek & Davis (2010), linear in the number
  of pixels; the approximation pydensecrf computes (same lattice scale, blur and
  interpolation), a fraction of a second for a 224 px image; or
- 'exact': the sum over every pixel pair (the Gaussian kernel separably, the bilateral one
  in O(N^2)), for small images and as the reference the lattice is checked against.

No native package is needed; the release's pydensecrf is not a dependency.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import ml_collections
import numpy as np
from scipy import sparse

METHODS = ("lattice", "exact")
# Added to p and 1 - p before the log, as the release does.
UNARY_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class CrfParams:
  """The CRF's parameters; the defaults are the release's (utils/box_utils.apply_crf).

  iterations: mean-field steps (5).
  gaussian_sxy, gaussian_compat: position kernel width (pixels) and Potts weight (3, 3).
  bilateral_sxy, bilateral_srgb, bilateral_compat: position width (pixels), colour width
    (0-255 units) and Potts weight of the bilateral kernel (80, 13, 10).
  """

  iterations: int = 5
  gaussian_sxy: float = 3.0
  gaussian_compat: float = 3.0
  bilateral_sxy: float = 80.0
  bilateral_srgb: float = 13.0
  bilateral_compat: float = 10.0

  def __post_init__(self):
    if bad := _param_problems(dataclasses.asdict(self)):
      raise ValueError("\n".join(f"CrfParams.{f}: {m}" for f, m in bad))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "CrfParams":
    """config.contracam.crf_* as CrfParams; ValueError naming every bad field, one a line
    (the switches contracam.crf and contracam.crf_masks included)."""
    c = config.contracam
    errors = [
        f"config.contracam.{f}: must be True or False, got {c[f]!r}"
        for f in ("crf", "crf_masks")
        if not isinstance(c[f], bool)
    ]
    fields = {f.name: c[f"crf_{f.name}"] for f in dataclasses.fields(cls)}
    errors += [f"config.contracam.crf_{f}: {m}" for f, m in _param_problems(fields)]
    if errors:
      raise ValueError("\n".join(errors))
    return cls(**fields)


def _param_problems(fields: dict) -> list[tuple[str, str]]:
  """(field, message) for every invalid CrfParams field."""
  out = []
  it = fields["iterations"]
  if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 1:
    out.append(("iterations", f"must be an integer >= 1, got {it!r}"))
  for f in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
    v = fields[f]
    if not (_is_number(v) and v > 0 and math.isfinite(v)):
      out.append((f, f"must be a finite number > 0, got {v!r}"))
  for f in ("gaussian_compat", "bilateral_compat"):
    v = fields[f]
    if not (_is_number(v) and v >= 0 and math.isfinite(v)):
      out.append((f, f"must be a finite number >= 0, got {v!r}"))
  return out


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------
# Features: one row per pixel, row-major; x is the column, y the row.


def position_features(h: int, w: int, sxy: float) -> np.ndarray:
  """(h * w, 2) pixel positions (x, y) / sxy."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x.ravel(), y.ravel()], axis=1) / float(sxy)


def bilateral_features(image_uint8: np.ndarray, sxy: float, srgb: float) -> np.ndarray:
  """(h * w, 5) features (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)."""
  h, w, _ = image_uint8.shape
  rgb = np.asarray(image_uint8, np.float64).reshape(h * w, 3) / float(srgb)
  return np.concatenate([position_features(h, w, sxy), rgb], axis=1)


# ----------------------------------------------------------------------------
# Filtering: out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j.


def gaussian_filter_exact(features: np.ndarray, values: np.ndarray, chunk: int = 1024):
  """Exact Gaussian filtering of (N, C) values by (N, d) features, O(N^2), in row chunks."""
  f = np.asarray(features, np.float64)
  v = np.asarray(values, np.float64)
  sq = np.sum(f * f, axis=1)
  out = np.empty_like(v)
  for s in range(0, len(f), chunk):
    d2 = sq[s : s + chunk, None] + sq[None, :] - 2.0 * f[s : s + chunk] @ f.T
    out[s : s + chunk] = np.exp(-0.5 * np.maximum(d2, 0.0)) @ v
  return out


def position_filter_exact(h: int, w: int, sxy: float, values: np.ndarray) -> np.ndarray:
  """Exact filtering of (h * w, C) values by the position kernel: separable, O(N (h + w))."""
  gy = np.exp(-0.5 * ((np.arange(h)[:, None] - np.arange(h)[None, :]) / sxy) ** 2)
  gx = np.exp(-0.5 * ((np.arange(w)[:, None] - np.arange(w)[None, :]) / sxy) ** 2)
  v = np.asarray(values, np.float64).reshape(h, w, -1)
  return np.einsum("ab,bwc,xw->axc", gy, v, gx).reshape(h * w, -1)


class PermutohedralLattice:
  """Approximate Gaussian filtering in linear time (Adams, Baek & Davis 2010).

  Each (d-dim) feature is lifted onto the hyperplane sum = 0 of R^(d+1), scaled as
  Adams et al. prescribe for a unit-variance Gaussian (the kernel realised is a coarse
  approximation of it, the one pydensecrf uses), and splatted with
  barycentric weights onto the d + 1 vertices of its enclosing simplex. Filtering is
  splat, a [1/2, 1, 1/2] blur along each of the d + 1 lattice directions, and
  slice (interpolation back with the same weights). The lattice is built once per
  feature set (per image) and reused by every filtering.
  """

  def __init__(self, features: np.ndarray):
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or not np.all(np.isfinite(f)):
      raise ValueError(f"features must be a finite (N, d) array, got shape {f.shape}")
    n, d = f.shape
    self.num_points, self.dim = n, d
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = inv_std / np.sqrt((np.arange(d) + 1.0) * (np.arange(d) + 2.0))
    cf = f * scale
    # Elevate: e_j = sum_{k > j} cf_k - j cf_j (cf 1-based), e_0 = sum of all.
    tail = np.concatenate([np.cumsum(cf[:, ::-1], axis=1)[:, ::-1], np.zeros((n, 1))], axis=1)
    elevated = tail.copy()
    elevated[:, 1:] = tail[:, 1:] - np.arange(1, d + 1) * cf
    # Nearest remainder-0 lattice point, then the simplex (rank order of the residuals).
    rem0 = np.rint(elevated / (d + 1)) * (d + 1)
    total = np.rint(rem0.sum(axis=1) / (d + 1)).astype(np.int64)
    diff = elevated - rem0
    idx = np.arange(d + 1)
    later = idx[None, :] > idx[:, None]  # [i, j]: j after i
    # pydensecrf's order: for i < j, rank_i += diff_i < diff_j, else rank_j += 1.
    greater = diff[:, None, :] > diff[:, :, None]  # [n, i, j]: diff_j > diff_i
    not_less = diff[:, None, :] >= diff[:, :, None]  # [n, i, j]: diff_j >= diff_i
    rank = np.sum(np.where(later, greater, not_less & later.T), axis=2)
    rank = rank + total[:, None]
    low, high = rank < 0, rank > d
    rank = rank + (d + 1) * low - (d + 1) * high
    rem0 = rem0 + (d + 1) * low - (d + 1) * high
    # Barycentric weights of the d + 1 vertices.
    v = (elevated - rem0) / (d + 1)
    bary = np.zeros((n, d + 2))
    rows = np.arange(n)
    for i in range(d + 1):
      bary[rows, d - rank[:, i]] += v[:, i]
      bary[rows, d - rank[:, i] + 1] -= v[:, i]
    bary[:, 0] += 1.0 + bary[:, d + 1]
    self.weights = bary[:, : d + 1]
    # Vertex keys (the first d coordinates; the last is minus their sum).
    r = np.arange(d + 1)
    canonical = np.where(r[None, :] <= d - r[:, None], r[:, None], r[:, None] - (d + 1))
    rem0_int = np.rint(rem0[:, :d]).astype(np.int64)
    keys = rem0_int[:, None, :] + canonical[:, rank[:, :d]].transpose(1, 0, 2)  # (n, d+1, d)
    keys = keys.reshape(-1, d)
    self._lo = int(keys.min()) - d - 1
    self._base = int(keys.max()) + d + 2 - self._lo
    if self._base ** max(d, 1) >= 2**62:
      raise ValueError(
          f"features span too wide a range for the lattice ({self._base} lattice steps per "
          "axis): use wider kernels (larger sxy / srgb)"
      )
    codes, first, inverse = np.unique(self._encode(keys), return_index=True, return_inverse=True)
    self._codes = codes
    self.num_vertices = len(codes)
    self.offsets = inverse.reshape(n, d + 1)
    # Splat as a sparse (vertices x points) matrix of barycentric weights; slice is its
    # transpose (duplicate entries add up, as splatting does).
    self._splat = sparse.csr_matrix(
        (self.weights.ravel(), (inverse.ravel(), np.repeat(np.arange(n), d + 1))),
        shape=(self.num_vertices, n),
    )
    self._slice = self._splat.T.tocsr()
    vertex_keys = keys[first]
    # Neighbours along each lattice direction; index num_vertices (a zero slot) if absent.
    self.neighbours = []
    for j in range(d + 1):
      n1, n2 = vertex_keys - 1, vertex_keys + 1
      if j < d:
        n1[:, j] = vertex_keys[:, j] + d
        n2[:, j] = vertex_keys[:, j] - d
      self.neighbours.append((self._find(n1), self._find(n2)))

  def _encode(self, keys: np.ndarray) -> np.ndarray:
    powers = self._base ** np.arange(keys.shape[1], dtype=np.int64)
    return (keys - self._lo) @ powers

  def _find(self, keys: np.ndarray) -> np.ndarray:
    codes = self._encode(keys)
    pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
    return np.where(self._codes[pos] == codes, pos, len(self._codes))

  def filter(self, values: np.ndarray) -> np.ndarray:
    """(N, C) values filtered by the lattice's approximate Gaussian kernel."""
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[0] != self.num_points:
      raise ValueError(f"values must be ({self.num_points}, C), got {values.shape}")
    m = self.num_vertices
    grid = np.zeros((m + 1, values.shape[1]))
    grid[:m] = self._splat @ values
    for n1, n2 in self.neighbours:
      blurred = np.zeros_like(grid)
      blurred[:m] = grid[:m] + 0.5 * (grid[n1] + grid[n2])
      grid = blurred
    alpha = 1.0 / (1.0 + 2.0 ** (-self.dim))
    return alpha * (self._slice @ grid[:m])


# ----------------------------------------------------------------------------
# Mean field.


Filter = Callable[[np.ndarray], np.ndarray]


def mean_field(
    unary: np.ndarray, kernels: Sequence[tuple[Filter, float]], iterations: int
) -> np.ndarray:
  """(L, N) marginals Q of a dense CRF with (L, N) unary energies and Potts kernels.

  Q = softmax(-U); then `iterations` times Q = softmax(-U + sum_k w_k Kn_k Q), with
  Kn_k = D^-1/2 K_k D^-1/2, D = K_k 1 (+1e-20) and K_k applied by `kernels[k][0]`
  to (N, L) arrays. Potts: a label is rewarded by the kernel-weighted mass of the
  same label around it (pydensecrf's form, equal to the Potts penalty up to a
  constant per pixel).
  """
  u = np.asarray(unary, np.float64)
  n = u.shape[1]
  norms = [1.0 / np.sqrt(k(np.ones((n, 1)))[:, 0] + 1e-20) for k, _ in kernels]
  q = _softmax(-u)
  for _ in range(iterations):
    logits = -u
    for (k, w), norm in zip(kernels, norms):
      logits = logits + w * (norm[:, None] * k(norm[:, None] * q.T)).T
    q = _softmax(logits)
  return q


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=0, keepdims=True))
  return e / e.sum(axis=0, keepdims=True)


def prob_unary(prob: np.ndarray) -> np.ndarray:
  """(2, H, W) float32 unary energies -log([p, 1 - p] + 1e-20) of a foreground map, as the
  release builds them (float32)."""
  p = np.asarray(prob, np.float32)
  return -np.log(np.stack([p, np.float32(1.0) - p]) + np.float32(UNARY_EPS))


def dense_crf(
    image_uint8: np.ndarray,
    unary: np.ndarray,
    params: CrfParams = CrfParams(),
    method: str = "lattice",
) -> np.ndarray:
  """(L, H, W) marginals of the dense CRF on an (H, W, 3) uint8 image, (L, H, W) unary."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  image = np.asarray(image_uint8)
  u = np.asarray(unary)
  if u.ndim != 3 or image.dtype != np.uint8 or image.shape != u.shape[1:] + (3,):
    raise ValueError(
        f"image_uint8 must be uint8 (H, W, 3) with unary (L, H, W); got image {image.dtype} "
        f"{image.shape}, unary {u.shape}"
    )
  if not np.all(np.isfinite(u)):
    raise ValueError("unary has non-finite values")
  num_labels, h, w = u.shape
  p = params
  pos = position_features(h, w, p.gaussian_sxy)
  bil = bilateral_features(image, p.bilateral_sxy, p.bilateral_srgb)
  if method == "lattice":
    kernels = [
        (PermutohedralLattice(pos).filter, p.gaussian_compat),
        (PermutohedralLattice(bil).filter, p.bilateral_compat),
    ]
  else:
    kernels = [
        (lambda v: position_filter_exact(h, w, p.gaussian_sxy, v), p.gaussian_compat),
        (lambda v: gaussian_filter_exact(bil, v), p.bilateral_compat),
    ]
  q = mean_field(u.reshape(num_labels, h * w), kernels, p.iterations)
  return q.reshape(num_labels, h, w)


def refine_crf(
    image_uint8: np.ndarray,
    prob: np.ndarray,
    params: CrfParams = CrfParams(),
    method: str = "lattice",
) -> np.ndarray:
  """CRF-refined foreground probability (H, W) float32 of a map in [0, 1].

  Labels (foreground, background) with unary -log(p + 1e-20), -log(1 - p + 1e-20);
  the pairwise terms pull the map onto the image's colour edges. The release
  applies this to ContraCAM's union map before cleaning and box extraction.
  """
  p = np.asarray(prob)
  if p.ndim != 2:
    raise ValueError(f"prob must be a single (H, W) map, got shape {p.shape}")
  if not (np.all(np.isfinite(p)) and p.min() >= 0 and p.max() <= 1):
    raise ValueError("prob must be finite and in [0, 1]")
  return dense_crf(image_uint8, prob_unary(p), params, method)[0].astype(np.float32)

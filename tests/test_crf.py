"""The dense CRF of ocl_jax/discovery/crf.py against a loop-written mean field, hand-made
images, and pydensecrf's marginals (the library the release calls, recorded by
tests/make_crf_reference.py)."""

import math

import ml_collections
import numpy as np
import pytest

from ocl_jax.discovery import crf
from tests.make_crf_reference import CASES, PATH, scene


def _params(p: dict) -> crf.CrfParams:
  return crf.CrfParams(
      iterations=p["iterations"],
      gaussian_sxy=p["gs"],
      gaussian_compat=p["gc"],
      bilateral_sxy=p["bs"],
      bilateral_srgb=p["br"],
      bilateral_compat=p["bc"],
  )


def loop_mean_field(image, prob, params: crf.CrfParams) -> np.ndarray:
  """Foreground marginal, written out pixel pair by pixel pair in float64: kernels with the
  pixel's own weight, D^-1/2 K D^-1/2 normalisation, Potts reward, softmax per pixel."""
  h, w = prob.shape
  pixels = [(y, x) for y in range(h) for x in range(w)]
  n = len(pixels)
  k_pos, k_bil = np.zeros((n, n)), np.zeros((n, n))
  for i, (yi, xi) in enumerate(pixels):
    for j, (yj, xj) in enumerate(pixels):
      d2 = (xi - xj) ** 2 + (yi - yj) ** 2
      c2 = sum((float(image[yi, xi, c]) - float(image[yj, xj, c])) ** 2 for c in range(3))
      k_pos[i, j] = math.exp(-d2 / (2 * params.gaussian_sxy**2))
      k_bil[i, j] = math.exp(
          -d2 / (2 * params.bilateral_sxy**2) - c2 / (2 * params.bilateral_srgb**2)
      )
  kernels = []
  for k, weight in ((k_pos, params.gaussian_compat), (k_bil, params.bilateral_compat)):
    inv = [1 / math.sqrt(sum(k[i]) + 1e-20) for i in range(n)]
    kn = np.array([[inv[i] * k[i, j] * inv[j] for j in range(n)] for i in range(n)])
    kernels.append((kn, weight))
  p32 = prob.astype(np.float32).ravel()
  unary = [
      [float(-np.log(np.float32(v) + np.float32(1e-20))) for v in p32],
      [float(-np.log(np.float32(1) - np.float32(v) + np.float32(1e-20))) for v in p32],
  ]

  def softmax(logits):  # logits[label][pixel]
    out = [[0.0] * n, [0.0] * n]
    for i in range(n):
      top = max(logits[0][i], logits[1][i])
      e = [math.exp(logits[lab][i] - top) for lab in (0, 1)]
      for lab in (0, 1):
        out[lab][i] = e[lab] / (e[0] + e[1])
    return out

  q = softmax([[-u for u in unary[lab]] for lab in (0, 1)])
  for _ in range(params.iterations):
    logits = [[-u for u in unary[lab]] for lab in (0, 1)]
    for kn, weight in kernels:
      for lab in (0, 1):
        ql = np.array(q[lab])
        for i in range(n):
          logits[lab][i] += weight * float(kn[i] @ ql)
    q = softmax(logits)
  return np.array(q[0]).reshape(h, w)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(PATH))


# ----------------------------------------------------------------------------
# Mean field against the loop reference (exact filtering) and the lattice against both.


def test_exact_crf_matches_the_loop_reference_on_16x16():
  image, prob = scene(16, 16, seed=3)
  params = crf.CrfParams()
  want = loop_mean_field(image, prob, params)
  got = crf.refine_crf(image, prob, params, method="exact")
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert 0.05 < np.mean(np.abs(want - prob)) and np.any((want > 0.5) != (prob > 0.5))


def test_exact_crf_matches_the_loop_reference_non_square_narrow_kernels():
  image, prob = scene(8, 12, seed=4)
  params = _params(CASES["narrow"])
  np.testing.assert_allclose(
      crf.refine_crf(image, prob, params, method="exact"),
      loop_mean_field(image, prob, params),
      atol=1e-6,
  )


@pytest.mark.parametrize("tag", ["24x24", "20x32"])
@pytest.mark.parametrize("case", list(CASES))
def test_lattice_matches_pydensecrf(reference, tag, case):
  """Same lattice as pydensecrf: its float32 marginals up to float32 rounding."""
  image, prob = reference[f"{tag}/image"], reference[f"{tag}/prob"]
  got = crf.refine_crf(image, prob, _params(CASES[case]), method="lattice")
  np.testing.assert_allclose(got, reference[f"{tag}/{case}"], atol=2e-5)


@pytest.mark.parametrize("tag", ["24x24", "20x32"])
def test_exact_is_close_to_pydensecrf(reference, tag):
  """The lattice approximates the Gaussian kernels; the exact CRF is a few % away at most."""
  image, prob = reference[f"{tag}/image"], reference[f"{tag}/prob"]
  want = reference[f"{tag}/release"]
  got = crf.refine_crf(image, prob, method="exact")
  assert np.abs(got - want).max() < 0.05
  assert np.mean((got > 0.5) == (want > 0.5)) > 0.99


def test_lattice_filter_approximates_the_gaussian_kernel():
  """Normalised filtering (K v / K 1) of image-like features: a coarse approximation
  (pixels with few neighbours in colour space are off most), close on average."""
  image, _ = scene(24, 24, seed=5)
  feats = crf.bilateral_features(image, sxy=80.0, srgb=13.0)
  values = np.random.default_rng(0).uniform(size=(len(feats), 2))
  lattice = crf.PermutohedralLattice(feats)
  ones = np.ones((len(feats), 1))
  approx = lattice.filter(values) / lattice.filter(ones)
  exact = crf.gaussian_filter_exact(feats, values) / crf.gaussian_filter_exact(feats, ones)
  err = np.abs(approx - exact)
  assert err.mean() < 0.01 and np.quantile(err, 0.9) < 0.02 and err.max() < 0.2
  pos = crf.position_features(24, 24, 3.0)
  np.testing.assert_allclose(
      crf.position_filter_exact(24, 24, 3.0, values), crf.gaussian_filter_exact(pos, values)
  )


def test_lattice_rejects_bad_values():
  lattice = crf.PermutohedralLattice(np.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"\(4, C\)"):
    lattice.filter(np.ones((3, 1)))
  with pytest.raises(ValueError, match="finite"):
    crf.PermutohedralLattice(np.full((4, 2), np.nan))


# ----------------------------------------------------------------------------
# Hand-checkable cases, both filterings.


@pytest.mark.parametrize("method", crf.METHODS)
def test_uniform_image_smooths_a_noisy_unary(method):
  rng = np.random.default_rng(0)
  image = np.full((16, 16, 3), 128, np.uint8)
  prob = np.full((16, 16), 0.8, np.float32)
  flipped = rng.uniform(size=prob.shape) < 0.2
  prob[flipped] = 0.3
  assert flipped.sum() > 20
  q = crf.refine_crf(image, prob, method=method)
  assert q.min() > 0.9  # every flipped pixel joins its neighbours
  # Without pairwise terms the marginal is the map itself.
  alone = crf.CrfParams(gaussian_compat=0.0, bilateral_compat=0.0)
  np.testing.assert_allclose(crf.refine_crf(image, prob, alone, method=method), prob, atol=1e-6)


@pytest.mark.parametrize("method", crf.METHODS)
def test_labels_follow_a_strong_edge(method):
  """A map spilling 3 columns over a black/white edge: the CRF cuts it at the edge."""
  image = np.zeros((16, 16, 3), np.uint8)
  image[:, 8:] = 255
  prob = np.full((16, 16), 0.3, np.float32)
  prob[:, 5:] = 0.7
  q = crf.refine_crf(image, prob, method=method)
  right = np.broadcast_to(np.arange(16)[None, :] >= 8, (16, 16))
  np.testing.assert_array_equal(q > 0.5, right)
  assert q[:, 5:8].max() < 0.1 and q[:, 8:].min() > 0.9


def test_mean_field_zero_iterations_is_the_unary_softmax():
  u = np.array([[0.0, 1.0, 3.0], [1.0, 0.0, 0.5]])
  q = crf.mean_field(u, [(lambda v: v, 5.0)], iterations=0)
  np.testing.assert_allclose(q, np.exp(-u) / np.exp(-u).sum(0))
  # One step with the identity kernel: D = 1, the message is w * Q.
  q1 = crf.mean_field(u, [(lambda v: v, 2.0)], iterations=1)
  logits = -u + 2.0 * q
  np.testing.assert_allclose(q1, np.exp(logits) / np.exp(logits).sum(0))


# ----------------------------------------------------------------------------
# Parameters and errors.


def test_defaults_are_the_release_parameters():
  p = crf.CrfParams()
  assert (p.iterations, p.gaussian_sxy, p.gaussian_compat) == (5, 3, 3)
  assert (p.bilateral_sxy, p.bilateral_srgb, p.bilateral_compat) == (80, 13, 10)
  assert p == _params(CASES["release"])


def _contracam_config(**overrides):
  from ocl_jax.configuration import load_sibling_config
  import pathlib

  root = pathlib.Path(__file__).parents[1]
  c = load_sibling_config(str(root / "configs" / "default.py"), "default.py")
  for k, v in overrides.items():
    c.contracam[k] = v
  return c


def test_from_config_reads_and_validates_every_field():
  assert crf.CrfParams.from_config(_contracam_config()) == crf.CrfParams()
  c = _contracam_config(crf_iterations=3, crf_bilateral_srgb=20.0)
  assert crf.CrfParams.from_config(c) == crf.CrfParams(iterations=3, bilateral_srgb=20.0)
  bad = _contracam_config(crf_iterations=0, crf_gaussian_sxy=0.0, crf_bilateral_compat=-1.0)
  with pytest.raises(ValueError) as err:
    crf.CrfParams.from_config(bad)
  lines = str(err.value).splitlines()
  assert [line.split(":")[0] for line in lines] == [
      "config.contracam.crf_iterations",
      "config.contracam.crf_gaussian_sxy",
      "config.contracam.crf_bilateral_compat",
  ]
  fields = _contracam_config().contracam.to_dict()
  switch = ml_collections.ConfigDict({"contracam": {**fields, "crf": "yes"}})
  with pytest.raises(ValueError, match="config.contracam.crf: must be True or False"):
    crf.CrfParams.from_config(switch)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="CrfParams.bilateral_srgb"):
    crf.CrfParams(bilateral_srgb=float("inf"))
  with pytest.raises(ValueError, match="CrfParams.iterations"):
    crf.CrfParams(iterations=True)
  image = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="uint8"):
    crf.refine_crf(image.astype(np.float32), np.zeros((4, 4)))
  with pytest.raises(ValueError, match="uint8"):
    crf.refine_crf(image[:3], np.zeros((4, 4)))
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    crf.refine_crf(image, np.full((4, 4), 1.5))
  with pytest.raises(ValueError, match="method"):
    crf.refine_crf(image, np.zeros((4, 4)), method="fast")

"""Writes tests/data/pydensecrf_reference.npz: pydensecrf's dense-CRF marginals on small
images, the library the release's `--apply_crf` calls (utils/box_utils.apply_crf).

tests/test_crf.py checks ocl_jax/discovery/crf.py against them. ocl_jax does not depend on
pydensecrf: record them again, only when the cases change, in a separate environment with
NumPy and pydensecrf (e.g. `pip install numpy pydensecrf2`), as a plain script from the
repository root: `python tests/make_crf_reference.py`. It imports nothing from ocl_jax.
"""

from __future__ import annotations

import pathlib

import numpy as np

PATH = pathlib.Path(__file__).parent / "data" / "pydensecrf_reference.npz"
# The release's parameters, then one kernel at a time for one step.
RELEASE = dict(iterations=5, gs=3.0, gc=3.0, bs=80.0, br=13.0, bc=10.0)
CASES = {
    "release": RELEASE,
    "gaussian_only": dict(RELEASE, iterations=1, bc=0.0),
    "bilateral_only": dict(RELEASE, iterations=1, gc=0.0),
    "narrow": dict(iterations=3, gs=1.5, gc=2.0, bs=6.0, br=20.0, bc=5.0),
}


def scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A noisy two-colour ellipse image (uint8) and a blurry off-centre blob in [0, 1] (float32),
  a coarse ContraCAM-like map that straddles the object's edge."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  inside = ((x - 0.55) / 0.25) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1
  image = np.where(inside[..., None], [200, 80, 60], [60, 120, 170]) + rng.normal(0, 15, (h, w, 3))
  prob = np.exp(-(((x - 0.45) / 0.3) ** 2 + ((y - 0.5) / 0.35) ** 2))
  prob = (prob - prob.min()) / (prob.max() - prob.min())
  return np.clip(image, 0, 255).astype(np.uint8), prob.astype(np.float32)


def pydensecrf_marginal(image, prob, p) -> np.ndarray:
  """The release's apply_crf for one image, with the parameters `p` (W, H in pydensecrf's
  order; the release passes (h, w), the same for its square images)."""
  import pydensecrf.densecrf as dcrf

  h, w = prob.shape
  unary = -np.log(np.stack([prob, 1 - prob]).reshape(2, -1) + 1e-20)
  d = dcrf.DenseCRF2D(w, h, 2)
  d.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
  d.addPairwiseGaussian(sxy=p["gs"], compat=p["gc"])
  d.addPairwiseBilateral(
      sxy=p["bs"], srgb=p["br"], rgbim=np.ascontiguousarray(image), compat=p["bc"]
  )
  return np.array(d.inference(p["iterations"])).reshape(2, h, w)[0]


def main() -> None:
  out = {}
  for shape, seed in (((24, 24), 0), ((20, 32), 1)):
    image, prob = scene(*shape, seed)
    tag = f"{shape[0]}x{shape[1]}"
    out[f"{tag}/image"], out[f"{tag}/prob"] = image, prob
    for name, p in CASES.items():
      out[f"{tag}/{name}"] = pydensecrf_marginal(image, prob, p)
  np.savez_compressed(PATH, **out)
  print(f"wrote {PATH} ({len(out)} arrays)")


if __name__ == "__main__":
  main()

"""Mixup / CutMix of view 1: mixing identities, lambda ranges, the pasted box, the loss wiring."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocl_jax.views import image_mixing
from ocl_jax.configuration import ConfigError, validate_config
from tests.conftest import train_two_steps


def _images(n=8, h=12, w=10, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, h, w, 3)).astype(np.float32))


def test_mixup_is_the_convex_combination_with_the_donor():
  x = _images()
  mixed, lam, perm = jax.jit(image_mixing.mixup, static_argnums=3)(jax.random.PRNGKey(0), x, 0, 1.0)
  assert sorted(np.asarray(perm).tolist()) == list(range(8))
  lam = np.asarray(lam)
  assert np.all((lam >= 0.5) & (lam <= 1.0)) and len(np.unique(lam)) == 8  # per image
  want = (
      lam[:, None, None, None] * np.asarray(x)
      + (1 - lam[:, None, None, None]) * np.asarray(x)[perm]
  )
  np.testing.assert_allclose(mixed, want, rtol=1e-6, atol=1e-6)


def test_mixup_lambdas_follow_the_global_index_not_the_split():
  """Per-image lambdas depend on the image's global index: two halves at offsets 0 and 4
  get the same lambdas as... themselves in any other split (the permutation is per batch)."""
  x = _images()
  key = jax.random.PRNGKey(1)
  _, lam_whole, _ = image_mixing.mixup(key, x, 0)
  _, lam_a, _ = image_mixing.mixup(key, x[:4], 0)
  _, lam_b, _ = image_mixing.mixup(key, x[4:], 4)
  np.testing.assert_array_equal(np.concatenate([lam_a, lam_b]), lam_whole)


def test_mixup_beta_alpha_other_than_one():
  lams = [float(image_mixing.symmetric_beta(jax.random.PRNGKey(i), 0.2)) for i in range(20)]
  assert all(0.5 <= v <= 1.0 for v in lams)
  assert np.mean(lams) > 0.8  # Beta(0.2, 0.2) is U-shaped: lambda mostly near 1


@pytest.mark.parametrize(
    "u, lam, want",
    [
        ((0.5, 0.5), 0.75, ((3, 9), (3, 7))),  # sides 6x5 around (6, 5): half-sides 3 and 5//2=2
        ((0.0, 0.0), 0.75, ((0, 3), (0, 2))),  # centred in the corner: clipped to a quarter
        ((0.99, 0.5), 1.0, ((11, 11), (5, 5))),  # lambda 1: empty box
    ],
)
def test_cutmix_box_hand_cases(u, lam, want):
  rows, cols = image_mixing.cutmix_box(jnp.array(u), lam, 12, 10)
  assert (tuple(np.asarray(rows)), tuple(np.asarray(cols))) == want


def test_cutmix_pastes_one_box_and_lambda_is_the_own_area():
  x = _images()
  mixed, lam, perm = image_mixing.cutmix(jax.random.PRNGKey(2), x, 0)
  mixed, x, perm = np.asarray(mixed), np.asarray(x), np.asarray(perm)
  moved = perm != np.arange(8)  # fixed points mix with themselves
  assert moved.sum() >= 2
  from_donor = (np.all(mixed == x[perm], axis=-1) & ~np.all(mixed == x, axis=-1))[moved]
  assert np.all(from_donor == from_donor[:1])  # one box for the batch
  rows, cols = np.nonzero(from_donor[0])
  if len(rows):  # it is a rectangle
    assert from_donor[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
  own = 1 - from_donor[0].sum() / from_donor[0].size
  np.testing.assert_allclose(np.asarray(lam), own, rtol=1e-6)
  assert np.all((np.asarray(lam) >= 0.0) & (np.asarray(lam) <= 1.0))


def test_mix_config_is_validated(tiny_config):
  c = tiny_config
  c.mix.kind = "mixp"
  with pytest.raises(ConfigError, match="mix.kind"):
    validate_config(c, 4, 1)
  c.mix.kind, c.method = "cutmix", "byol"
  with pytest.raises(ConfigError, match="MoCo baseline"):
    validate_config(c, 4, 1)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_tiny_training_with_mixing(tiny_config, tmp_path, caplog, kind):
  tiny_config.mix.kind = kind
  _, log = train_two_steps(tiny_config, tmp_path, caplog)
  losses = [float(v) for v in re.findall(r"\bloss=([0-9.eE+-]+)", log)]
  assert losses and np.isfinite(losses[-1])

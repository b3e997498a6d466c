"""Learning-rate schedule and optimisers against the release's formulas and PyTorch SGD."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ocl_jax import optimizers


def _config(name="sgd", warmup=0):
  return ml_collections.ConfigDict(
      {
          "batch_size": 512,
          "optim": {
              "name": name,
              "base_lr": 0.03,
              "final_lr": 1e-3,
              "warmup_steps": warmup,
              "momentum": 0.9,
              "weight_decay": 1e-4,
              "lars_trust_coefficient": 1e-3,
          },
      }
  )


def test_cosine_schedule_matches_release_formula():
  sched = optimizers.learning_rate_schedule(_config(), total_steps=100)
  peak, final = 0.03 * 512 / 256, 1e-3
  for t in (0, 13, 50, 77, 100):
    expected = final + 0.5 * (peak - final) * (1 + np.cos(np.pi * t / 100))
    np.testing.assert_allclose(float(sched(t)), expected, rtol=1e-6)


def test_warmup_is_linear_then_cosine():
  sched = optimizers.learning_rate_schedule(_config(warmup=10), total_steps=110)
  peak = 0.06
  np.testing.assert_allclose(
      [float(sched(t)) for t in range(10)], [peak * (t + 1) / 10 for t in range(10)], rtol=1e-6
  )
  np.testing.assert_allclose(float(sched(10)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(sched(110)), 1e-3, rtol=1e-6)


def test_sgd_is_pytorch_sgd_with_weight_decay_and_momentum():
  tx = optimizers.create_optimizer(_config(), total_steps=2)
  sched = optimizers.learning_rate_schedule(_config(), total_steps=2)
  p = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(p)
  grads = [np.array([0.5, 0.1]), np.array([-0.3, 0.2])]
  ref_p, buf = np.array([1.0, -2.0]), np.zeros(2)
  for t, g in enumerate(grads):
    updates, state = tx.update({"w": jnp.array(g)}, state, p)
    p = optax.apply_updates(p, updates)
    d = g + 1e-4 * ref_p  # torch.optim.SGD: decay added to the gradient
    buf = 0.9 * buf + d if t else d  # momentum buffer starts at the first gradient
    ref_p = ref_p - float(sched(t)) * buf
  np.testing.assert_allclose(p["w"], ref_p, rtol=1e-6)


def test_lars_excludes_biases_and_bn_from_decay_and_adaptation():
  tx = optimizers.create_optimizer(_config("lars"), total_steps=10)
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}
  state = tx.init(params)
  zero = {"kernel": jnp.zeros((3, 3)), "bias": jnp.zeros(3)}
  updates, _ = tx.update(zero, state, params)
  assert np.all(np.asarray(updates["bias"]) == 0)  # no weight decay on 1-D params
  assert np.all(np.asarray(updates["kernel"]) < 0)  # decay pulls kernels toward 0

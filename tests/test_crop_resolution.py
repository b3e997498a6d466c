"""The crop-resolution measurement (ocl_jax/tools/crop_resolution.py): its scores against
hand-computed cases and a brute-force SSIM, its two crops against each other, and a tiny run."""

import itertools
import json
import math

import numpy as np
import pytest

from ocl_jax.tools import crop_resolution as cr


def test_psnr_hand_cases():
  a = np.zeros((4, 5, 3))
  assert cr.psnr(a, a) == math.inf
  assert cr.psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01
  assert cr.psnr(a, a + 25.5, data_range=255.0) == pytest.approx(20.0)
  b = a.copy()
  b[0, 0, 0] = 1.0  # MSE 1/60
  assert cr.psnr(a, b) == pytest.approx(10 * math.log10(60))


def test_gaussian_window():
  w = cr.gaussian_window(11, 1.5)
  assert w.shape == (11,) and w.sum() == pytest.approx(1.0)
  np.testing.assert_allclose(w, w[::-1])
  assert w[5] / w[4] == pytest.approx(math.exp(1 / (2 * 1.5**2)))


def _ssim_brute_force(a, b, size=11, sigma=1.5, k1=0.01, k2=0.03, data_range=1.0):
  """SSIM window by window with explicit loops: the definition, nothing shared with ssim()."""
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
  g /= g.sum()
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  values = []
  for ch in range(a.shape[2]):
    for i, j in itertools.product(range(a.shape[0] - size + 1), range(a.shape[1] - size + 1)):
      pa, pb = a[i : i + size, j : j + size, ch], b[i : i + size, j : j + size, ch]
      ma, mb = (g * pa).sum(), (g * pb).sum()
      va, vb = (g * (pa - ma) ** 2).sum(), (g * (pb - mb) ** 2).sum()
      cov = (g * (pa - ma) * (pb - mb)).sum()
      values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
  return np.mean(values)


def test_ssim_matches_the_windowed_definition():
  rng = np.random.default_rng(0)
  a = rng.random((14, 17, 2))
  b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
  assert cr.ssim(a, b) == pytest.approx(_ssim_brute_force(a, b), rel=1e-10)
  assert cr.ssim(a, b) == pytest.approx(cr.ssim(b, a), rel=1e-12)  # symmetric
  assert cr.ssim(a[..., 0], b[..., 0]) == pytest.approx(_ssim_brute_force(a[..., :1], b[..., :1]))


def test_ssim_hand_cases():
  rng = np.random.default_rng(1)
  a = rng.random((20, 20, 3))
  assert cr.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
  # Flat images: no variance, only the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
  c1 = 0.01**2
  flat = cr.ssim(np.full((16, 16), 0.2), np.full((16, 16), 0.6))
  assert flat == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel=1e-9)
  # More noise, lower SSIM; an inverted image is anti-correlated.
  noisy = [np.clip(a + s * rng.standard_normal(a.shape), 0, 1) for s in (0.02, 0.1, 0.3)]
  scores = [cr.ssim(a, n) for n in noisy]
  assert 1 > scores[0] > scores[1] > scores[2]
  assert cr.ssim(a, 1 - a) < 0


def test_ssim_rejects_bad_input():
  with pytest.raises(ValueError, match="differ in shape"):
    cr.ssim(np.zeros((12, 12)), np.zeros((12, 13)))
  with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
    cr.ssim(np.zeros((10, 30)), np.zeros((10, 30)))


def test_sources_are_deterministic_uint8_of_the_asked_shape():
  for kind in cr.SOURCE_KINDS:
    a = cr.source_images(kind, 2, 30, 44, seed=3)
    assert a.shape == (2, 30, 44, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, cr.source_images(kind, 2, 30, 44, seed=3))
    assert not np.array_equal(a, cr.source_images(kind, 2, 30, 44, seed=4))
    assert a.std() > 10  # not a blank image
  with pytest.raises(ValueError, match="unknown source kind"):
    cr.source_images("photos", 1, 8, 8, 0)


def test_dead_leaves_discs_cover_the_ground():
  image = cr.dead_leaves(np.random.default_rng(0), 60, 80)
  ground = np.all(image == 128, axis=-1).mean()
  assert ground < 0.1  # about e^-4 of it shows
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # many discs


def test_reference_and_device_crops_agree_on_the_source():
  """The same box through PIL and through augment_batch on the full-resolution image: the
  two resamplers differ by rounding only, so a host size's loss is the host resize's."""
  image = cr.source_images("dead_leaves", 1, 40, 56, seed=0)[0]
  same = cr.reference_crop(image[:, :40], (0, 0, 1, 1), 40)
  np.testing.assert_array_equal(same, image[:, :40] / np.float32(255))  # identity box
  cfg = cr.plain_crop_config(24, (0.2, 1.0), (3 / 4, 4 / 3))
  views, boxes = cr.device_crops(cr.jax.random.PRNGKey(0), image, 56 / 40, cfg, 4)
  for view, box in zip(np.asarray(views), np.asarray(boxes)):
    ref = cr.reference_crop(image, box, 24)
    assert cr.psnr(view, ref) > 45 and cr.ssim(view, ref) > 0.999


def test_boxes_follow_the_true_aspect_of_the_squared_image():
  """resize_to_square keeps W/H, the device crops keep true pixel proportions with it; with
  the aspect lost (1) they would not."""
  height, width = 40, 72
  image = cr.source_images("scenes", 1, height, width, seed=0)[0]
  square, aspect = cr.host_square(image, 32)
  assert square.shape == (32, 32, 3) and square.dtype == np.uint8
  assert aspect == np.float32(width) / np.float32(height)
  cfg = cr.plain_crop_config(16, (0.2, 1.0), (3 / 4, 4 / 3))

  def pixel_ratios(aspect):
    boxes = np.asarray(cr.device_crops(cr.jax.random.PRNGKey(1), square, aspect, cfg, 64)[1])
    return (boxes[:, 2] - boxes[:, 0]) * width / ((boxes[:, 3] - boxes[:, 1]) * height)

  r = pixel_ratios(aspect)
  assert r.min() >= 3 / 4 - 1e-4 and r.max() <= 4 / 3 + 1e-4
  lost = pixel_ratios(1.0)
  assert lost.max() > 4 / 3 + 0.1


def testmedian_times_in_turns(monkeypatch):
  clock, calls = [0.0], []

  def fn(name, seconds):
    def run():
      calls.append(name)
      clock[0] += seconds
      return np.zeros(())

    return run

  monkeypatch.setattr(cr.time, "perf_counter", lambda: clock[0])
  out = cr.median_times({"a": fn("a", 3.0), "b": fn("b", 1.0)}, repeats=3)
  assert out == {"a": 3.0, "b": 1.0}
  assert calls == ["a", "b"] * 4  # one untimed run each, then three turns


def test_summarise_ratios_and_scores():
  recs = []
  for size, kind, p, s, up in [
      ("source", "k", 50.0, 1.0, False),
      (8, "k", 30.0, 0.9, True),
      (8, "k", 34.0, 0.95, False),
      (16, "k", 40.0, 0.99, False),
  ]:
    recs.append({"host_size": size, "kind": kind, "psnr": p, "ssim": s, "upsampled": up})
  recs.append({"host_size": 16, "kind": "k", "psnr": 42.0, "ssim": 0.97, "upsampled": True})
  times = {"crop 8": 1.0, "crop 16": 3.0, "augment 8": 2.0, "augment 16": 4.0, "model": 8.0}
  source, r8, r16 = cr.summarise(recs, times, [8, 16])
  assert source["host_size"] == "source" and "bytes_per_image" not in source
  assert r8["psnr_mean"] == 32.0 and r8["psnr_sd"] == 2.0 and r8["upsampled"] == 0.5
  assert r16["ssim_mean"] == pytest.approx(0.98) and r16["by_kind"]["k"]["psnr_mean"] == 41.0
  assert r16["bytes_per_image"] == 16 * 16 * 3
  assert r8["crop_ratio"] == 1.0 and r16["crop_ratio"] == 3.0 and r16["augment_ratio"] == 2.0
  assert r16["step_ratio"] == pytest.approx((4 + 8) / (2 + 8))
  table = cr.markdown_table([source, r8, r16], ["k"])
  assert table.count("\n") == 4 and "| 16 | 41.0 ± 1.0 |" in table


def test_augmentation_and_model_functions_run():
  cfg = cr.plain_crop_config(12, (0.2, 1.0), (3 / 4, 4 / 3))
  v1, v2 = cr.augmentation_fn(20, 2, cfg)()
  assert v1.shape == v2.shape == (2, 12, 12, 3) and not np.array_equal(v1, v2)
  grads = cr.model_step_fn(1, 32, arch="resnet10", width=4)()
  leaves = cr.jax.tree_util.tree_leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.abs(g).max() > 0 for g in leaves)


def test_tiny_run_writes_the_table_and_json(tmp_path, capsys):
  out = tmp_path / "crop.json"
  args = ["--quick", "--host_sizes=16", "--source_shapes=40x56", "--time_repeats=0"]
  result = cr.main(args + [f"--out={out}"])
  saved = json.loads(out.read_text())
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  source, host = saved["rows"]
  assert source["crops"] == host["crops"] == 2 * 3  # two kinds, one image, three crops
  # The squared 16 px image holds less than the 40x56 source: every score is lower.
  assert source["psnr_mean"] > 45 and host["psnr_mean"] < source["psnr_mean"] - 10
  assert host["ssim_mean"] < source["ssim_mean"]
  assert host["upsampled"] == 1.0 and host["bytes_per_image"] == 16 * 16 * 3
  printed = capsys.readouterr().out
  assert "| source (full res.) |" in printed and "| 16 |" in printed


@pytest.mark.parametrize(
    "arg, named",
    [
        ("--kinds=photos", "--kinds"),
        ("--crop_size=8", "--crop_size"),
        ("--source_shapes=480by640", "HEIGHTxWIDTH"),
    ],
)
def test_bad_arguments_are_named(arg, named, capsys):
  with pytest.raises(SystemExit):
    cr.parse_args([arg])
  assert named in capsys.readouterr().err

"""The renderer of `scenes` (data/scenes.py): layouts, shapes, textures, backgrounds, paint.

Pure NumPy functions of explicit random generators; the builder decides which
stream each batch of scenes draws from, so changing code here changes the data
(the builder's version then changes too).
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES = (
    'circle',
    'square',
    'triangle',
    'star',
    'cross',
    'ring',
    'diamond',
    'hexagon',
    'crescent',
    'ellipse',
)
FAMILY_NAMES = (
    'stripes',
    'checks',
    'clouds',
    'gradient',
    'dots',
    'rings',
    'waves',
    'grid',
    'mosaic',
    'bricks',
)
NUM_CLASSES = len(CLASS_NAMES)
NUM_FAMILIES = len(FAMILY_NAMES)
# Background family that co-occurs with each class under the background bias.
CLASS_FAMILY = np.array([3, 7, 0, 5, 9, 1, 8, 4, 2, 6])
# Companion class that co-occurs with each primary class under the context bias.
PARTNER = np.array([4, 6, 9, 0, 7, 2, 1, 3, 5, 8])

MAX_OBJECTS = 3
MIN_SCALE, MAX_SCALE = 0.15, 0.45  # object diameter as a fraction of the side

# --------------------------------------------------------------------------
# Scene layout.


@dataclasses.dataclass
class Layout:
  """Objects of a batch of scenes, in paint order (back to front).

  Slots without an object have class -1. Lengths are in pixels.
  """

  classes: np.ndarray  # (n, MAX_OBJECTS) int
  centers: np.ndarray  # (n, MAX_OBJECTS, 2) float (y, x)
  radii: np.ndarray  # (n, MAX_OBJECTS) float
  angles: np.ndarray  # (n, MAX_OBJECTS) float, radians
  colors: np.ndarray  # (n, MAX_OBJECTS, 2, 3) float RGB in [0, 1]
  params: np.ndarray  # (n, MAX_OBJECTS, 3) float in [0, 1]: texture jitter


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB, so colour families can be defined by hue."""
  h = np.mod(h, 1.0) * 6.0
  k = np.mod(np.array([5.0, 3.0, 1.0]) + h[..., None], 6.0)
  f = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return v[..., None] * (1.0 - s[..., None] * f)


def _crowded(centers: np.ndarray, radii: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Scenes where two objects overlap so much that one would mostly vanish."""
  bad = np.zeros(centers.shape[0], bool)
  for i in range(MAX_OBJECTS):
    for j in range(i + 1, MAX_OBJECTS):
      d = np.linalg.norm(centers[:, i] - centers[:, j], axis=-1)
      close = d < 0.5 * (radii[:, i] + radii[:, j])
      bad |= close & valid[:, i] & valid[:, j]
  return bad


def sample_layout(
    rng: np.random.Generator, n: int, image_size: int, context_bias: float, single: bool = False
) -> Layout:
  """Samples classes, placements and colours of the objects of `n` scenes.

  Slot 0 is the primary object (largest scale); slot 1, when present, is of
  class PARTNER[primary] with probability `context_bias`. Slots are shuffled
  into a random paint order at the end.
  """
  if single:
    counts = np.ones(n, int)
  else:
    counts = rng.choice([1, 2, 3], size=n, p=[0.3, 0.45, 0.25])
  primary = rng.integers(0, NUM_CLASSES, n)
  # Non-partner companions are uniform over the other nine classes.
  other = (PARTNER[primary] + rng.integers(1, NUM_CLASSES, n)) % NUM_CLASSES
  second = np.where(rng.random(n) < context_bias, PARTNER[primary], other)
  third = rng.integers(0, NUM_CLASSES, n)
  classes = np.stack([primary, second, third], axis=1)
  valid = np.arange(MAX_OBJECTS)[None] < counts[:, None]
  classes = np.where(valid, classes, -1)

  scales = np.concatenate(
      [
          rng.uniform(0.3 if not single else 0.25, MAX_SCALE, (n, 1)),
          rng.uniform(MIN_SCALE, 0.3, (n, MAX_OBJECTS - 1)),
      ],
      axis=1,
  )
  radii = scales * image_size / 2
  span = (image_size - 2 * radii)[..., None]
  centers = radii[..., None] + rng.random((n, MAX_OBJECTS, 2)) * span
  for _ in range(30):  # rejection: re-place objects of crowded scenes
    bad = _crowded(centers, radii, valid)
    if not bad.any():
      break
    fresh = radii[..., None] + rng.random((n, MAX_OBJECTS, 2)) * span
    centers[bad] = fresh[bad]
  angles = rng.uniform(0, 2 * np.pi, (n, MAX_OBJECTS))

  # Colour family: class hue, with jitter wide enough that hue alone is a
  # weak cue and shape has to be used.
  safe = np.maximum(classes, 0)
  hue = safe / NUM_CLASSES + rng.uniform(-0.06, 0.06, classes.shape)
  sat = rng.uniform(0.55, 0.95, classes.shape)
  val = rng.uniform(0.7, 1.0, classes.shape)
  dark = val * rng.uniform(0.35, 0.6, classes.shape)
  colors = np.stack([hsv_to_rgb(hue, sat, val), hsv_to_rgb(hue + 0.05, sat, dark)], axis=2)
  params = rng.random((n, MAX_OBJECTS, 3))

  # Random paint order; empty slots stay at the end.
  keys = np.where(valid, rng.random((n, MAX_OBJECTS)), 2.0)
  order = np.argsort(keys, axis=1)

  def take(a):
    idx = order.reshape(order.shape + (1,) * (a.ndim - 2))
    return np.take_along_axis(a, idx, axis=1)

  return Layout(
      classes=take(classes),
      centers=take(centers),
      radii=take(radii),
      angles=take(angles),
      colors=take(colors),
      params=take(params),
  )


# --------------------------------------------------------------------------
# Object shapes and textures, on local coordinates (u, v) in units of the
# object radius: every shape fits in the unit disc.

SHADES = 64  # texture weights are quantised to this many levels (see paint)


def _polygon_gauge(u: np.ndarray, v: np.ndarray, sides: int) -> np.ndarray:
  """Gauge of the regular polygon with circumradius 1 (<= 1 inside).

  Half-plane tests are much cheaper than polar coordinates.
  """
  angles = (2 * np.arange(sides) + 1) * np.pi / sides  # face normals
  gauge = u * np.float32(np.cos(angles[0])) + v * np.float32(np.sin(angles[0]))
  for a in angles[1:]:
    gauge = np.maximum(gauge, u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)))
  return gauge / np.float32(np.cos(np.pi / sides))


def _star_radius(u: np.ndarray, v: np.ndarray, points: int, inner: float) -> np.ndarray:
  """Boundary radius of a star polygon (tips at radius 1) towards (u, v)."""
  sector = 2 * np.pi / points
  theta = np.arctan2(v, u)
  t = np.abs(theta - sector * np.floor(theta / sector + 0.5))
  dx = np.float32(inner * np.cos(sector / 2) - 1.0)
  dy = np.float32(inner * np.sin(sector / 2))
  return dy / (np.cos(t) * dy - np.sin(t) * dx)


def _frac(x: np.ndarray) -> np.ndarray:
  """x mod 1 (np.mod is several times slower)."""
  return x - np.floor(x)


def _soft_wave(x: np.ndarray) -> np.ndarray:
  """Stripe profile with crisp but not aliased edges."""
  return np.clip(0.5 + 2.0 * np.sin(x), 0.0, 1.0)


def shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside test of class `cls`'s shape; the shape is what defines a class."""
  if cls == 0:  # circle
    return u * u + v * v <= 1.0
  if cls == 1:  # square
    return np.maximum(np.abs(u), np.abs(v)) <= 0.7
  if cls == 2:  # triangle
    return _polygon_gauge(u, v, 3) <= 1.0
  if cls == 3:  # five-pointed star
    return u * u + v * v <= _star_radius(u, v, 5, 0.42) ** 2
  if cls == 4:  # cross
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
  if cls == 5:  # ring
    rho2 = u * u + v * v
    return (rho2 <= 1.0) & (rho2 >= 0.55**2)
  if cls == 6:  # diamond
    return np.abs(u) + np.abs(v) / 0.6 <= 1.0
  if cls == 7:  # hexagon
    return _polygon_gauge(u, v, 6) <= 1.0
  if cls == 8:  # crescent
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.85**2)
  if cls == 9:  # ellipse
    return u * u + 4.0 * v * v <= 1.0
  raise ValueError(f'unknown class {cls}')


def object_texture(cls: int, u: np.ndarray, v: np.ndarray, p: np.ndarray) -> np.ndarray:
  """Mix weight in [0, 1] between an object's two colours.

  Each class has its own pattern, fixed to the object frame (it rotates and
  scales with the object); `p` (m, 3) jitters frequency and phase.
  """
  p0, p1, p2 = (p[:, k, None, None] for k in range(3))
  if cls == 0:  # shaded sphere
    return np.clip(0.8 * np.sqrt((u + 0.4) ** 2 + (v + 0.4) ** 2) - 0.2, 0, 1)
  if cls == 1:  # stripes
    return _soft_wave(2 * np.pi * ((2.0 + 1.5 * p0) * u + p1))
  if cls == 2:  # dark rim
    return np.clip((_polygon_gauge(u, v, 3) - 0.55) * 2.5, 0, 1)
  if cls == 3:  # linear gradient
    return np.clip(0.5 + 0.5 * u * (0.8 + 0.4 * p0), 0, 1)
  if cls == 4:  # checks
    f = 1.25 + 0.75 * p0
    return ((_frac(f * u + 2 * p1) < 0.5) ^ (_frac(f * v + 2 * p2) < 0.5)).astype(np.float32)
  if cls == 5:  # spokes
    k = 6 + np.floor(4 * p0)
    return _soft_wave(k * np.arctan2(v, u) + 2 * np.pi * p1)
  if cls == 6:  # dots
    f = 3.0 + 2.0 * p0
    du, dv = _frac(f * u + p1) - 0.5, _frac(f * v + p2) - 0.5
    return (du * du + dv * dv < 0.09).astype(np.float32)
  if cls == 7:  # concentric bands
    return _soft_wave(2 * np.pi * ((2.0 + p0) * np.sqrt(u * u + v * v) + p1))
  if cls == 8:  # gradient across the horns
    return np.clip(0.5 + 0.6 * v, 0, 1)
  if cls == 9:  # diagonal stripes
    return _soft_wave(2 * np.pi * ((2.5 + 1.5 * p0) * (u + v) * 0.7071 + p1))
  raise ValueError(f'unknown class {cls}')


def _quantise(t: np.ndarray) -> np.ndarray:
  """Texture weight in [0, 1] -> shade level in [0, SHADES)."""
  return (t * (SHADES - 1) + 0.5).astype(np.uint8)


def render_objects(layout: Layout, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Paints the objects back to front.

  Each object is evaluated only in a window around it, batched over the
  objects of one class, slot and size bin. Returns the index map
  (n, S, S) int8 (slot of the visible object at each pixel, -1 for
  background) and the shade map (n, S, S) uint8 (its quantised texture
  weight, 0 on the background); `paint` turns them into colours.
  """
  n = layout.classes.shape[0]
  index = np.full((n, image_size, image_size), -1, np.int8)
  shade = np.zeros((n, image_size, image_size), np.uint8)
  # Two window sizes: companions are small, a max-size window wastes work.
  split_r = 0.3 * image_size / 2
  bins = [(0.0, split_r), (split_r, np.inf)]
  for slot in range(MAX_OBJECTS):
    for cls in range(NUM_CLASSES):
      for lo, hi in bins:
        r = layout.radii[:, slot]
        img = np.nonzero((layout.classes[:, slot] == cls) & (r > lo) & (r <= hi))[0]
        if img.size == 0:
          continue
        r = r[img]
        half = int(np.ceil(r.max())) + 1
        steps = np.arange(2 * half + 1)
        cy, cx = layout.centers[img, slot, 0], layout.centers[img, slot, 1]
        oy = np.floor(cy).astype(int) - half  # window origin
        ox = np.floor(cx).astype(int) - half
        dy = (oy[:, None] + steps + 0.5 - cy[:, None]) / r[:, None]
        dx = (ox[:, None] + steps + 0.5 - cx[:, None]) / r[:, None]
        dy = dy.astype(np.float32)[:, :, None]
        dx = dx.astype(np.float32)[:, None, :]
        ang = layout.angles[img, slot]
        cos = np.cos(ang).astype(np.float32)[:, None, None]
        sin = np.sin(ang).astype(np.float32)[:, None, None]
        u = cos * dx + sin * dy
        v = cos * dy - sin * dx
        m, wy, wx = np.nonzero(shape_mask(cls, u, v))
        t = object_texture(cls, u, v, layout.params[img, slot].astype(np.float32))
        t = np.broadcast_to(t, u.shape)[m, wy, wx]
        # Shapes lie within their radius, so inside pixels are in the
        # image; clipping only guards against rounding at the border.
        py = np.clip(oy[m] + wy, 0, image_size - 1)
        px = np.clip(ox[m] + wx, 0, image_size - 1)
        index[img[m], py, px] = slot
        shade[img[m], py, px] = _quantise(t)
  return index, shade


def visible_objects(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Visible pixel area (n, MAX_OBJECTS) and box (n, MAX_OBJECTS, 4) per slot.

  Boxes are normalised (ymin, xmin, ymax, xmax) of the pixel edges, as in
  TFDS coco/2017; slots with no visible pixel get area 0 and a zero box.
  """
  n, h, w = index.shape
  areas = np.zeros((n, MAX_OBJECTS), np.int64)
  boxes = np.zeros((n, MAX_OBJECTS, 4), np.float32)
  for slot in range(MAX_OBJECTS):
    vis = index == slot
    rows, cols = vis.any(axis=2), vis.any(axis=1)
    areas[:, slot] = np.count_nonzero(vis.reshape(n, -1), axis=1)
    ymin, ymax = rows.argmax(1), h - rows[:, ::-1].argmax(1)
    xmin, xmax = cols.argmax(1), w - cols[:, ::-1].argmax(1)
    box = np.stack([ymin / h, xmin / w, ymax / h, xmax / w], axis=1)
    boxes[:, slot] = np.where(areas[:, slot, None] > 0, box, 0.0)
  return areas, boxes


# --------------------------------------------------------------------------
# Backgrounds.


def choose_families(
    rng: np.random.Generator, labels: np.ndarray, mode: str, bias: float
) -> np.ndarray:
  """Background family per scene; -1 means black (Only-FG).

  'biased': CLASS_FAMILY[label] with probability `bias`, otherwise uniform
  over the nine other families; 'same': always the class's family;
  'rand': uniform over all families; 'black': none.
  """
  n = labels.shape[0]
  own = CLASS_FAMILY[labels]
  if mode == 'biased':
    other = (own + rng.integers(1, NUM_FAMILIES, n)) % NUM_FAMILIES
    return np.where(rng.random(n) < bias, own, other)
  if mode == 'same':
    return own
  if mode == 'rand':
    return rng.integers(0, NUM_FAMILIES, n)
  if mode == 'black':
    return np.full(n, -1)
  raise ValueError(f'unknown background mode {mode!r}')


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upsampling of (m, g, g) value noise to (m, size, size)."""
  g = grid.shape[1]
  pos = (np.arange(size) + 0.5) / size * (g - 1)
  i0 = np.minimum(np.floor(pos).astype(int), g - 2)
  w = (pos - i0).astype(np.float32)
  rows = grid[:, i0] * (1 - w)[:, None] + grid[:, i0 + 1] * w[:, None]
  return rows[:, :, i0] * (1 - w) + rows[:, :, i0 + 1] * w


def background_pattern(family: int, rng: np.random.Generator, m: int, size: int) -> np.ndarray:
  """Mix weight (m, S, S) in [0, 1] of `m` random instances of a family."""
  p = rng.random((m, 4)).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi, m).astype(np.float32)
  p0, p1, p2, p3 = (p[:, k, None, None] for k in range(4))
  ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  y, x = c[None, :, None], c[None, None, :]
  xr, yr = ca * x + sa * y, ca * y - sa * x  # rotated, centred coords
  if family == 0:  # stripes
    return _soft_wave(2 * np.pi * ((3 + 5 * p0) * xr + p1))
  if family == 1:  # checks
    f = 1.25 + 2 * p0
    return ((_frac(f * xr + p1) < 0.5) ^ (_frac(f * yr + p2) < 0.5)).astype(np.float32)
  if family == 2:  # clouds: smooth value noise
    return _upsample(rng.random((m, 5, 5)).astype(np.float32), size)
  if family == 3:  # linear gradient
    return np.clip(0.5 + (0.9 + 0.5 * p0) * xr, 0, 1)
  if family == 4:  # dots
    f = 4 + 4 * p0
    du, dv = _frac(f * xr + p1) - 0.5, _frac(f * yr + p2) - 0.5
    return (du * du + dv * dv < (0.18 + 0.12 * p3) ** 2).astype(np.float32)
  if family == 5:  # concentric rings around a random centre
    d = np.sqrt((x - p1 + 0.5) ** 2 + (y - p2 + 0.5) ** 2)
    return _soft_wave(2 * np.pi * (3 + 4 * p0) * d)
  if family == 6:  # waves
    bend = 0.12 * np.sin(2 * np.pi * ((1 + p1) * xr + p2))
    return _soft_wave(2 * np.pi * ((3 + 3 * p0) * (yr + bend) + p3))
  if family == 7:  # grid lines
    f, w = 3 + 4 * p0, 0.1 + 0.08 * p3
    return ((_frac(f * xr + p1) < w) | (_frac(f * yr + p2) < w)).astype(np.float32)
  if family == 8:  # mosaic of flat random tiles
    tiles = 6 + np.floor(8 * p0[:, 0, 0]).astype(int)
    grid = rng.random((m, 14, 14)).astype(np.float32)
    idx = np.floor((c + 0.5)[None, :] * tiles[:, None]).astype(int)  # (m, S)
    return grid[np.arange(m)[:, None, None], idx[:, :, None], idx[:, None, :]]
  if family == 9:  # bricks
    f = 3 + 3 * p0
    rows = f * yr + p1
    odd = _frac(0.5 * np.floor(rows))  # 0 or 0.5: alternate row offset
    return ((_frac(rows) < 0.15) | (_frac(0.5 * f * xr + odd + p2) < 0.08)).astype(np.float32)
  raise ValueError(f'unknown background family {family}')


def render_backgrounds(
    rng: np.random.Generator, families: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Backgrounds for the given families (-1: black).

  Returns the shade map (n, S, S) uint8 and the colour pair (n, 2, 3) in
  [0, 1] of each background. Colours are muted (low saturation), so they
  stay distinct from the saturated objects even where the pattern types
  coincide.
  """
  n = families.shape[0]
  shade = np.zeros((n, size, size), np.uint8)
  colors = np.zeros((n, 2, 3))
  for fam in range(NUM_FAMILIES):
    img = np.nonzero(families == fam)[0]
    if img.size == 0:
      continue
    m = img.size
    hue = fam / NUM_FAMILIES + 0.05 + rng.uniform(-0.05, 0.05, m)
    val = rng.uniform(0.3, 0.8, m)
    step = rng.uniform(0.15, 0.3, m)
    val2 = np.where(val > 0.55, val - step, val + step)
    colors[img] = np.stack(
        [
            hsv_to_rgb(hue, rng.uniform(0.1, 0.4, m), val),
            hsv_to_rgb(hue + rng.uniform(-0.08, 0.08, m), rng.uniform(0.1, 0.4, m), val2),
        ],
        axis=1,
    )
    shade[img] = _quantise(background_pattern(fam, rng, m, size))
  return shade, colors


def paint(
    index: np.ndarray, shade: np.ndarray, object_colors: np.ndarray, background_colors: np.ndarray
) -> np.ndarray:
  """RGB images (n, S, S, 3) uint8 from layer index and shade maps.

  Every pixel is a (layer, shade) code into a per-image palette of 4 x SHADES
  colours, so colouring is one table lookup instead of float blending of
  three channels. `object_colors` (n, MAX_OBJECTS, 2, 3) and
  `background_colors` (n, 2, 3) hold the colour pairs in [0, 1] that the
  shade interpolates between.
  """
  n = index.shape[0]
  pairs = np.concatenate([background_colors[:, None], object_colors], axis=1)
  w = np.linspace(0.0, 1.0, SHADES)[None, None, :, None]
  lut = pairs[:, :, None, 0] + w * (pairs[:, :, None, 1] - pairs[:, :, None, 0])
  lut = np.rint(lut * 255).astype(np.uint32).reshape(n, -1, 3)
  packed = (lut[..., 0] | (lut[..., 1] << 8) | (lut[..., 2] << 16)).astype(
      '<u4'
  )  # little-endian, so the bytes read R, G, B, 0
  code = (index + 1).astype(np.uint8) * np.uint8(SHADES) + shade  # < 256
  flat = code.reshape(n, -1) + (np.arange(n) * 4 * SHADES)[:, None]
  rgbx = packed.ravel()[flat].view(np.uint8)
  return np.ascontiguousarray(rgbx.reshape(index.shape + (4,))[..., :3])

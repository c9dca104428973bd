"""Model structure, presets, ablation configs and causality."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectrostream_jax import weights
from spectrostream_jax.models import codec


def n_params(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_production_parameter_count_and_split():
  shapes = codec.param_shapes(codec.production())
  counts = {k: n_params(v) for k, v in shapes.items()}
  assert counts == {
    'encoder': 9_251_904,
    'decoder': 35_684_546,
    'quantizer': 16_777_216,
  }
  assert n_params(shapes) == 61_713_666


def test_small_preset_keeps_the_production_layout():
  small, prod = codec.small(), codec.production()
  for field in (
    'sample_rate',
    'frame_length',
    'hop_length',
    'encoder_strides',
    'decoder_strides',
    'fusion_block',
    'split_block',
    'lookahead',
  ):
    assert getattr(small, field) == getattr(prod, field), field
  assert small.frame_rate == 25.0 and small.kbps_per_level == 0.25
  assert (small.quantizer.num_levels, small.quantizer.codebook_size) == (
    64,
    1024,
  )
  counts = {k: n_params(v) for k, v in codec.param_shapes(small).items()}
  assert counts == {
    'encoder': 620_880,
    'decoder': 2_316_082,
    'quantizer': 8_388_608,
  }


def test_parameter_paths_are_the_official_ones(shared_dir):
  spec = json.loads((shared_dir / 'vectors' / 'keys.json').read_text())
  official = {
    k.removeprefix('params/'): tuple(v['shape'])
    for k, v in spec['params'].items()
  }
  shapes = codec.param_shapes(codec.production())
  ours = {k: v.shape for k, v in weights.flat_paths(shapes).items()}
  assert ours == official
  for path, entry in spec['params'].items():
    assert weights.official_key(path.removeprefix('params/')) == (
      entry['file'],
      entry['key'],
    )


def test_bitrate_arithmetic():
  c = codec.production()
  assert c.frame_rate == 25.0 and c.samples_per_frame == 1920
  assert c.kbps_per_level == 0.25
  assert [c.kbps_for_levels(n) for n in (1, 16, 32, 48, 64)] == [
    0.25,
    4,
    8,
    12,
    16,
  ]
  assert c.levels_for_kbps(6) == 24 and c.levels_for_kbps(0.25) == 1
  for bad in (0, 0.3, 16.25):
    with pytest.raises(ValueError):
      c.levels_for_kbps(bad)


def test_latency():
  c = codec.production()
  assert c.latency_ms == 80.0 and c.worst_case_latency_ms == 90.0
  assert dataclasses.replace(c, lookahead=0).latency_ms == 40.0
  assert dataclasses.replace(c, lookahead=3).latency_ms == 160.0


@pytest.mark.parametrize(
  'change,enc6_in,dec0_in,dec1_in',
  [
    ({}, 512, 512, 512),
    ({'fusion_block': 5}, 256, 512, 512),  # fuse one block earlier
    ({'fusion_block': 7}, 256, 512, 512),  # one later (bottleneck fuses)
    ({'split_block': 1}, 512, 512, 1024),  # decoder splits one block later
    ({'split_block': -1}, 512, 256, 512),  # ... or before decoder_0
  ],
)
def test_ablation_configs_change_only_channel_counts(
  change, enc6_in, dec0_in, dec1_in
):
  shapes = codec.param_shapes(dataclasses.replace(codec.production(), **change))
  kernel = lambda part, unit, slot: shapes[part][unit][slot]['conv']['kernel']
  assert kernel('encoder', 'encoder_6', 'conv2d_4x3_a').shape[2] == enc6_in
  assert kernel('decoder', 'decoder_0', 'conv2dtranspose_4x3').shape[2] == (
    dec0_in
  )
  assert kernel('decoder', 'decoder_1', 'conv2dtranspose_4x4').shape[2] == (
    dec1_in
  )


@pytest.fixture(scope='module')
def tiny():
  cfg = codec.tiny()
  return cfg, codec.init_params(cfg, jax.random.key(1))


def _apply(cfg, params, method, x):
  m = codec.SpectroStream(cfg)
  fn = jax.jit(
    lambda p, v: m.apply({'params': p}, v, method=getattr(m, method))
  )
  return np.asarray(fn(params, x))


@pytest.mark.parametrize('t', [1920 * 3, 1920 * 5 + 700, 1920 * 7 + 1919])
def test_encoder_is_causal(tiny, t):
  cfg, params = tiny
  rng = np.random.default_rng(t)
  x = rng.uniform(-0.5, 0.5, (1, 1920 * 10, 2)).astype(np.float32)
  y = x.copy()
  y[:, t:] = rng.uniform(-0.5, 0.5, y[:, t:].shape)
  ex, ey = (_apply(cfg, params, 'embed', v) for v in (x, y))
  # Embedding m reads input samples <= 1920 m + 2399 (docs/architecture.md,
  # "Causal and transposed convolutions").
  clean = [m for m in range(ex.shape[1]) if 1920 * m + 2399 < t]
  np.testing.assert_array_equal(ex[:, clean], ey[:, clean])
  first_dirty = len(clean)
  assert not np.allclose(ex[:, first_dirty], ey[:, first_dirty])


@pytest.mark.parametrize('lookahead', [0, 1, 2])
def test_decoder_causality_follows_lookahead(lookahead):
  cfg = dataclasses.replace(codec.tiny(), lookahead=lookahead)
  params = codec.init_params(cfg, jax.random.key(2))
  rng = np.random.default_rng(lookahead)
  n, k = 10, 6
  e = rng.standard_normal((1, n, cfg.embedding_dim)).astype(np.float32)
  f = e.copy()
  f[:, k:] += 1.0  # Change embeddings >= k.
  wx, wy = (_apply(cfg, params, 'decode_embeddings', v) for v in (e, f))
  assert wx.shape == (1, cfg.output_samples(n), 2)
  # Output block m needs embeddings <= m + lookahead.
  clean = (k - lookahead) * 1920
  np.testing.assert_array_equal(wx[:, :clean], wy[:, :clean])
  assert not np.allclose(
    wx[:, clean : clean + 1920], wy[:, clean : clean + 1920]
  )


def test_end_to_end_causality(tiny):
  """Changing input after t leaves early decoded blocks bit-identical."""
  cfg, params = tiny
  rng = np.random.default_rng(3)
  x = rng.uniform(-0.5, 0.5, (1, 1920 * 12, 2)).astype(np.float32)
  t = 1920 * 8 + 500
  y = x.copy()
  y[:, t:] = 0.0
  ox, oy = (_apply(cfg, params, 'reconstruct', v) for v in (x, y))
  # Embeddings < m0 are clean; output block m needs embeddings <= m + 1.
  m0 = -(-(t - 2399) // 1920)
  clean = (m0 - cfg.lookahead) * 1920
  np.testing.assert_array_equal(ox[:, :clean], oy[:, :clean])
  assert not np.allclose(ox[:, clean:], oy[:, clean:])


def test_mono_preset_and_mono_input(tiny):
  cfg, params = tiny
  x = np.random.default_rng(4).uniform(-0.5, 0.5, (2, 1920 * 3, 1))
  x = x.astype(np.float32)
  mono_in = _apply(cfg, params, 'embed', x)
  dup = _apply(cfg, params, 'embed', np.repeat(x, 2, -1))
  np.testing.assert_array_equal(mono_in, dup)
  mono = dataclasses.replace(cfg, num_channels=1)
  mp = codec.init_params(mono, jax.random.key(0))
  out = _apply(mono, mp, 'reconstruct', x)
  assert out.shape == (2, 1920 * 2, 1)


def test_training_forward_and_gradients(tiny):
  cfg, params = tiny
  m = codec.SpectroStream(cfg)
  x = jnp.asarray(
    np.random.default_rng(5).uniform(-0.5, 0.5, (4, 1920 * 4, 2)), jnp.float32
  )

  def loss(p):
    recon, emb, q = m.apply({'params': p}, x, jax.random.key(0))
    ref = x[:, : recon.shape[1]]
    return jnp.mean(jnp.abs(recon - ref)) + jnp.mean(q.commitment)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  norms = {k: float(optax_norm(v)) for k, v in grads.items()}
  assert norms['encoder'] > 0 and norms['decoder'] > 0
  assert norms['quantizer'] == 0.0  # EMA codebooks get no gradient


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_bfloat16_compute_keeps_float32_params(tiny):
  cfg, params = tiny
  bf = dataclasses.replace(cfg, dtype='bfloat16')
  x = np.random.default_rng(6).uniform(-0.5, 0.5, (1, 1920 * 4, 2))
  x = x.astype(np.float32)
  a = _apply(cfg, params, 'embed', x)
  b = _apply(bf, params, 'embed', x)
  assert b.dtype == np.float32
  assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a)) + 1e-3
  assert not np.array_equal(a, b)

"""Multi-scale STFT discriminator: input features, shapes, parameters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectrostream_jax import signal
from spectrostream_jax.models import discriminator as disc

TINY = disc.DiscriminatorConfig(
  windows=(16, 32),
  base_channels=4,
  channel_multipliers=(1, 2),
  strides=((1, 2), (1, 2)),
)


def expected_params(config: disc.DiscriminatorConfig) -> int:
  """Parameter count written out from the architecture description."""
  total = 0
  for window in config.windows:
    base = config.base_channels
    st, sf = config.stem_stride
    stem = max(3, 2 * st) * max(3, 2 * sf)
    total += stem * config.input_channels * base + base
    cin = base
    for mult, (st, sf) in zip(
      config.channel_multipliers, config.strides, strict=True
    ):
      cout = base * mult
      total += 9 * cin * cin + cin  # conv_3x3
      total += max(3, 2 * st) * max(3, 2 * sf) * cin * cout + cout
      if cin != cout:
        total += cin * cout + cout  # 1x1 shortcut
      cin = cout
    bins = window // 2 // config.freq_stride
    total += 3 * bins * cin + 1  # logits conv over all remaining bins
  return total


def count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def param_shapes(config):
  return jax.eval_shape(lambda: disc.init_params(config, jax.random.key(0)))


def random_params(config, seed=0):
  """Fan-in scaled normal weights, built in numpy (compiling RNG is slow)."""
  rng = np.random.default_rng(seed)

  def fill(x):
    fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in), x.dtype)

  return jax.tree.map(fill, param_shapes(config))


def noise(shape, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.1
  )


def apply_fn(config):
  return jax.jit(disc.MultiScaleSTFTDiscriminator(config).apply)


@pytest.fixture(scope='module')
def tiny_params():
  return random_params(TINY)


@pytest.fixture(scope='module')
def apply_tiny():
  return apply_fn(TINY)


def test_default_config_shapes_and_parameter_count():
  config = disc.DiscriminatorConfig()
  model = disc.MultiScaleSTFTDiscriminator(config)
  wav = jax.ShapeDtypeStruct((2, 48_000, 2), jnp.float32)
  params = param_shapes(config)
  outputs = jax.eval_shape(model.apply, {'params': params}, wav)
  assert count(params) == expected_params(config) == 1_786_758
  assert len(outputs) == 6
  for window, (logits, features) in zip(config.windows, outputs, strict=True):
    frames = 1 + 48_000 // (window // 4)
    assert logits.shape == (2, frames)
    assert logits.dtype == jnp.float32
    bins = [window // 4, window // 8, window // 16, window // 32, window // 64]
    widths = [32, 32, 64, 64, 128]
    assert [f.shape for f in features] == [
      (2, frames, b, w) for b, w in zip(bins, widths, strict=True)
    ]
    kernel = params[f'stft_{window}']['logits']['kernel']
    assert kernel.shape == (3, window // 64, 128, 1)


def test_tiny_shapes_and_parameter_count(tiny_params, apply_tiny):
  assert count(tiny_params) == expected_params(TINY) == 2506
  outputs = apply_tiny({'params': tiny_params}, noise((2, 120, 2)))
  for window, (logits, features) in zip(TINY.windows, outputs, strict=True):
    frames = 1 + 120 // (window // 4)
    assert logits.shape == (2, frames)
    assert [f.shape for f in features] == [
      (2, frames, window // 4, 4),
      (2, frames, window // 8, 4),
      (2, frames, window // 16, 8),
    ]
    assert np.all(np.isfinite(logits))
    assert np.std(logits) > 1e-3


def test_stft_features_match_numpy():
  window, hop = 16, 4
  wav = np.asarray(noise((1, 50, 2), seed=1))
  feat = np.asarray(disc.stft_features(jnp.asarray(wav), window, hop))
  assert feat.shape == (1, 1 + 50 // hop, window // 2, 6)
  w = signal.hann_window(window)
  padded = np.pad(wav[0], ((window // 2, window // 2), (0, 0)))
  for t in (0, 5, 12):
    frame = padded[t * hop : t * hop + window] * w[:, None]
    spec = np.fft.rfft(frame, axis=0)[: window // 2] / np.sqrt(np.sum(w**2))
    for ch in range(2):
      got = feat[0, t, :, 3 * ch : 3 * ch + 3]
      np.testing.assert_allclose(got[:, 0], spec[:, ch].real, atol=1e-5)
      np.testing.assert_allclose(got[:, 1], spec[:, ch].imag, atol=1e-5)
      np.testing.assert_allclose(got[:, 2], np.abs(spec[:, ch]), atol=1e-5)


@pytest.mark.parametrize('window', [64, 1024])
def test_stft_features_have_unit_power_for_white_noise(window):
  wav = jnp.asarray(
    np.random.default_rng(2).standard_normal((1, 16_384, 1)), jnp.float32
  )
  mag = disc.stft_features(wav, window, window // 4)[:, 4:-4, 1:, 2]
  np.testing.assert_allclose(jnp.mean(mag**2), 1.0, rtol=0.05)


def test_swapping_channels_changes_input_and_logits(tiny_params, apply_tiny):
  wav = noise((2, 120, 2), seed=3)
  swapped = wav[..., ::-1]
  feat = disc.stft_features(wav, 32, 8)
  feat_swapped = disc.stft_features(swapped, 32, 8)
  # Both channels' re, im and |X| are present, in channel blocks of three.
  np.testing.assert_array_equal(feat_swapped[..., :3], feat[..., 3:])
  np.testing.assert_array_equal(feat_swapped[..., 3:], feat[..., :3])
  assert not np.allclose(feat_swapped, feat)
  out = apply_tiny({'params': tiny_params}, wav)
  out_swapped = apply_tiny({'params': tiny_params}, swapped)
  for (a, _), (b, _) in zip(out, out_swapped, strict=True):
    assert np.max(np.abs(a - b)) > 1e-3
  # With identical channels the swap is a no-op.
  dual = jnp.repeat(wav[..., :1], 2, axis=-1)
  out = apply_tiny({'params': tiny_params}, dual)
  out_swapped = apply_tiny({'params': tiny_params}, dual[..., ::-1])
  for (a, _), (b, _) in zip(out, out_swapped, strict=True):
    np.testing.assert_array_equal(a, b)


def test_mono_config_and_channel_check():
  mono = dataclasses.replace(
    TINY,
    num_channels=1,
    windows=(16,),
    channel_multipliers=(1,),
    strides=((1, 2),),
  )
  params = random_params(mono)
  assert params['stft_16']['stem']['kernel'].shape == (3, 4, 3, 4)
  ((logits, features),) = apply_fn(mono)({'params': params}, noise((2, 64, 1)))
  assert logits.shape == (2, 1 + 64 // 4)
  assert [f.shape[-2:] for f in features] == [(4, 4), (2, 4)]
  with pytest.raises(ValueError, match='expected'):
    disc.MultiScaleSTFTDiscriminator(mono).apply(
      {'params': params}, noise((2, 64, 2))
    )


def test_input_gradients_finite_including_silence(tiny_params):
  model = disc.MultiScaleSTFTDiscriminator(TINY)

  @jax.jit
  def grad(wav):
    def score(wav):
      outputs = model.apply({'params': tiny_params}, wav)
      return sum(jnp.sum(logits) for logits, _ in outputs)

    return jax.grad(score)(wav)

  silence_then_noise = jnp.concatenate(
    [jnp.zeros((1, 60, 2)), noise((1, 60, 2))], axis=1
  )
  g = grad(jnp.concatenate([silence_then_noise, jnp.zeros((1, 120, 2))]))
  assert np.all(np.isfinite(g))
  assert np.max(np.abs(g[0])) > 0


def test_elu_and_bfloat16_variants(tiny_params, apply_tiny):
  wav = noise((2, 120, 2), seed=4)
  ref = apply_tiny({'params': tiny_params}, wav)
  elu = dataclasses.replace(TINY, activation='elu')
  out_elu = apply_fn(elu)({'params': tiny_params}, wav)
  assert np.max(np.abs(out_elu[0][0] - ref[0][0])) > 1e-3
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  leaves = jax.tree.leaves(param_shapes(bf16))
  assert all(x.dtype == jnp.float32 for x in leaves)
  out_bf16 = apply_fn(bf16)({'params': tiny_params}, wav)
  for (a, _), (b, features) in zip(ref, out_bf16, strict=True):
    assert b.dtype == jnp.float32 and features[0].dtype == jnp.float32
    np.testing.assert_allclose(b, a, atol=0.05 * np.max(np.abs(a)))


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'activation': 'relu'}, 'activation'),
    ({'channel_multipliers': (1,)}, 'differ in length'),
    ({'windows': (30,)}, 'not divisible into hops'),
    ({'windows': (24,)}, 'freq stride'),
  ],
)
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY, **kwargs)

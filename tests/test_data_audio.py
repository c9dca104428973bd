"""Loudness, crop transforms and the procedural source (data/)."""

import math

import numpy as np
import pytest

from spectrostream_jax import channels
from spectrostream_jax.data import loudness
from spectrostream_jax.data import synthetic
from spectrostream_jax.data import transforms
from spectrostream_jax.models import codec as codec_lib

SR = 48_000


def _sine(freq, seconds, amplitude=1.0, rate=SR):
  t = np.arange(int(seconds * rate)) / rate
  return amplitude * np.sin(2 * np.pi * freq * t)


def _biquad(b, a, x):
  """Direct form I, sample by sample: the reference recursion."""
  y = np.zeros_like(x)
  for n in range(x.size):
    y[n] = b[0] * x[n]
    for k in (1, 2):
      if n >= k:
        y[n] += b[k] * x[n - k] - a[k] * y[n - k]
  return y


def test_k_weighting_coefficients_match_bs1770_table():
  (b1, a1), (b2, a2) = loudness.k_weighting_coefficients(SR)
  np.testing.assert_allclose(
    b1, [1.53512485958697, -2.69169618940638, 1.19839281085285], atol=1e-9
  )
  np.testing.assert_allclose(
    a1, [1.0, -1.69065929318241, 0.73248077421585], atol=1e-9
  )
  np.testing.assert_allclose(b2, [1.0, -2.0, 1.0])
  np.testing.assert_allclose(
    a2, [1.0, -1.99004745483398, 0.99007225036621], atol=1e-9
  )


@pytest.mark.parametrize('rate', [48_000, 44_100])
def test_k_weight_equals_recursive_filter(rate):
  x = np.random.default_rng(0).standard_normal((3000, 1))
  (b1, a1), (b2, a2) = loudness.k_weighting_coefficients(rate)
  want = _biquad(b2, a2, _biquad(b1, a1, x[:, 0]))
  got = loudness.k_weight(x, rate)[:, 0]
  np.testing.assert_allclose(got, want, atol=1e-9)


def test_measure_calibration_and_gating():
  # BS.1770: a 0 dBFS 997 Hz sine in one channel reads -3.01 LKFS.
  tone = _sine(997, 4)
  left_only = np.stack([tone, 0 * tone], axis=1)
  assert loudness.measure(left_only, SR).integrated == pytest.approx(
    -3.01, abs=0.01
  )
  both = np.stack([tone, tone], axis=1) * 0.1
  assert loudness.measure(both, SR).integrated == pytest.approx(-20, abs=0.01)
  # Silence is gated out of the integrated value, not out of the mean.
  half = np.concatenate([both, np.zeros_like(both)])
  level = loudness.measure(half, SR)
  # Blocks straddling the edge pass both gates and pull it down a little.
  assert level.integrated == pytest.approx(-20, abs=0.25)
  assert level.ungated == pytest.approx(-23.01, abs=0.05)
  assert loudness.measure(np.zeros((SR, 2)), SR).integrated == -math.inf


def test_fft_size_is_smooth_and_minimal():
  for n in (1, 7, 1025, 68_160, 262_145):
    size = loudness.fft_size(n)
    assert size >= n
    rest = size
    for p in (2, 3, 5):
      while rest % p == 0:
        rest //= p
    assert rest == 1
  assert loudness.fft_size(1025) == 1080


def test_channels():
  x = np.arange(12, dtype=np.float32).reshape(2, 6)
  mono = x[:, :1]
  np.testing.assert_array_equal(
    channels.to_channels(mono, 2, 'downmix'), np.concatenate([mono] * 2, 1)
  )
  np.testing.assert_array_equal(
    channels.to_channels(x, 2, 'first_two'), x[:, :2]
  )
  # 5.1 order L R C LFE Ls Rs: L only left, C equally, LFE dropped.
  eye = np.eye(6, dtype=np.float32)
  mixed = channels.to_channels(eye, 2, 'downmix')
  assert mixed[0, 0] > 0 and mixed[0, 1] == 0
  assert mixed[2, 0] == pytest.approx(mixed[2, 1]) and mixed[2, 0] > 0
  np.testing.assert_array_equal(mixed[3], [0, 0])
  np.testing.assert_allclose(mixed.sum(axis=0), [1, 1], rtol=1e-6)
  stereo = x[:, :2]
  np.testing.assert_allclose(
    channels.to_channels(stereo, 1, 'downmix'), stereo.mean(1, keepdims=True)
  )
  with pytest.raises(ValueError, match='channel mode'):
    channels.to_channels(x, 2, 'average')
  with pytest.raises(ValueError, match='1 or 2'):
    channels.to_channels(x, 6)


def test_in_graph_channels_agree_and_refuse_surround():
  """The model's own 1 <-> 2 conversion is `to_channels`' one; it refuses
  what only `to_channels` may mix, rather than averaging 5.1 to mono."""
  x = np.random.default_rng(0).standard_normal((7, 2)).astype(np.float32)
  for have, want in ((2, 1), (1, 2), (2, 2), (1, 1)):
    np.testing.assert_allclose(
      codec_lib.match_channels(x[:, :have], want),
      channels.to_channels(x[:, :have], want),
      rtol=1e-6,
    )
  with pytest.raises(ValueError, match='channels.to_channels first'):
    codec_lib.match_channels(np.zeros((7, 6), np.float32), 2)


@pytest.mark.parametrize('rate', [8_000, 44_100, 96_000])
def test_resample_crop_is_exact_and_keeps_pitch(rate):
  config = transforms.AudioConfig(crop_samples=4800)
  audio = _sine(1000, 1.0, 0.5, rate)[:, None].astype(np.float32)
  start = rate // 4
  lo, hi, lead = transforms.crop_window(audio.shape[0], start, config, rate)
  crop = transforms.resample_crop(
    transforms.Chunk(audio[lo:hi], rate, lead), config
  )
  assert crop.shape == (4800, 1)
  t = (np.arange(4800) + start * SR / rate) / SR
  want = 0.5 * np.sin(2 * np.pi * 1000 * t)
  # Same phase: the crop starts where it was asked to.
  assert np.max(np.abs(crop[:, 0] - want)) < 0.01


def test_finish_levels_and_limits():
  config = transforms.AudioConfig(crop_samples=9600, gain_db=3.0)
  rng = np.random.default_rng(0)
  for amplitude in (0.01, 0.3, 1.0):
    tone = np.stack([_sine(440, 0.2, amplitude)] * 2, 1).astype(np.float32)
    out = transforms.finish(transforms.Chunk(tone, SR, 0), config, rng)
    assert out.dtype == np.float32 and out.shape == (9600, 2)
    level = loudness.measure(out, SR).integrated
    assert -23.0 - 1e-6 <= level <= -17.0 + 1e-6
  # A square wave at 0 LUFS would clip: the peak is limited instead.
  square = np.sign(_sine(50, 0.2)) * 0.01
  loud = transforms.AudioConfig(crop_samples=9600, target_lufs=0, gain_db=0)
  out = transforms.finish(
    transforms.Chunk(np.stack([square] * 2, 1), SR, 0), loud, rng
  )
  assert np.max(np.abs(out)) == pytest.approx(loud.max_peak, rel=1e-5)


@pytest.mark.parametrize(
  ('audio', 'reason'),
  [
    (np.zeros((9600, 2)), 'silent_crop'),
    (np.full((9600, 2), 1e-5), 'silent_crop'),
    (np.where(np.arange(9600) == 5, np.nan, 0.1)[:, None], 'non_finite'),
    (np.ones((100, 2)), 'too_short'),
  ],
)
def test_finish_rejects(audio, reason):
  config = transforms.AudioConfig(crop_samples=9600)
  with pytest.raises(transforms.CropError) as e:
    transforms.finish(
      transforms.Chunk(audio.astype(np.float32), SR, 0),
      config,
      np.random.default_rng(0),
    )
  assert e.value.reason == reason


def test_synthetic_is_deterministic_stereo_and_varied():
  clips = [synthetic.render(np.random.default_rng(s), 24_000) for s in range(6)]
  again = synthetic.render(np.random.default_rng(3), 24_000)
  np.testing.assert_array_equal(clips[3], again)
  for clip in clips:
    assert clip.shape == (24_000, 2) and clip.dtype == np.float32
    assert np.all(np.isfinite(clip)) and 0.2 < np.max(np.abs(clip)) <= 0.5
    assert not np.allclose(clip[:, 0], clip[:, 1])  # panned and reverberant
  # Different seeds give different music: spectral centroids spread out.
  freqs = np.fft.rfftfreq(24_000, 1 / SR)
  centroids = []
  for clip in clips:
    power = np.abs(np.fft.rfft(clip.mean(1))) ** 2
    centroids.append(np.sum(freqs * power) / np.sum(power))
  assert np.ptp(centroids) > 100

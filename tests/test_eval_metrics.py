"""Evaluation metrics on cases with known answers, and the opus-tools wrapper.

ViSQOL is part of the `eval` extra that the README's test command
installs: when it is missing these tests fail, they do not skip.
"""

import jax
import numpy as np
import pytest

from spectrostream_jax.data import synthetic
from spectrostream_jax.evaluation import baselines
from spectrostream_jax.evaluation import degrade
from spectrostream_jax.evaluation import metrics
from spectrostream_jax.evaluation import opus

SR = 48_000


def stereo(seconds=1.0, seed=0):
  """Noise plus a tone, the right channel quieter and 10 samples late."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SR)) / SR
  s = 0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 300 * t)
  right = 0.5 * np.roll(s, 10) + 0.05 * rng.standard_normal(t.size)
  return np.stack([s, right], axis=1).astype(np.float32)


@pytest.fixture(scope='module')
def ref():
  return stereo()


@pytest.fixture(scope='module')
def identical(ref):
  return metrics.signal_metrics(ref, ref)


def needs_visqol():
  missing = metrics.visqol_missing()
  if missing:
    pytest.fail(f"{missing} (the README's test command installs it)")


def test_identical_signals(identical):
  m = identical
  assert m['mel_distance'] < 1e-6 and m['stft_distance'] < 1e-6
  assert m['lsd'] < 1e-3
  assert m['si_sdr'] > 80 and m['mid_snr'] > 80 and m['side_snr'] > 80
  for name in metrics.BAND_METRICS:
    assert m[name] < 1e-6
    assert len(m[f'{name}_bands']) == len(metrics.BAND_CENTRES_HZ)


def test_scaling_changes_everything_but_si_sdr_and_the_image(ref, identical):
  m = metrics.signal_metrics(ref, 0.5 * ref)
  assert m['si_sdr'] > 80
  # log10(0.5) = -0.3 in every bin.
  assert m['mel_distance'] == pytest.approx(0.3, abs=0.01)
  assert m['stft_distance'] == pytest.approx(0.3, abs=0.01)
  # 20 log10(2) dB in every bin above the floor.
  assert m['lsd'] == pytest.approx(6.02, abs=0.05)
  # The error is half the signal: 20 log10(2) dB.
  assert m['mid_snr'] == pytest.approx(6.02, abs=0.01)
  assert m['side_snr'] == pytest.approx(6.02, abs=0.01)
  for name in metrics.BAND_METRICS:
    assert m[name] < 1e-5  # A level change leaves the image as it is.


def test_swapped_channels(ref):
  m = metrics.signal_metrics(ref, np.ascontiguousarray(ref[:, ::-1]))
  # Caught by the stereo metrics...
  assert m['ild_error'] > 5 and m['ipd_error'] > 0.5 and m['side_snr'] < 0
  # ...not by those of the mono sum.
  assert m['mid_snr'] > 80


def test_inverted_channel(ref):
  m = metrics.signal_metrics(ref, ref * np.float32([1, -1]))
  assert m['ipd_error'] == pytest.approx(np.pi, abs=1e-3)
  assert m['side_snr'] < 0
  # Magnitudes, level differences and coherence are blind to it, and
  # SI-SDR too: it scales each channel, by -1 here.
  assert m['mel_distance'] < 1e-6 and m['stft_distance'] < 1e-6
  assert m['lsd'] < 1e-3
  assert m['ild_error'] < 1e-6 and m['icc_error'] < 1e-6
  assert m['si_sdr'] > 80


def test_white_noise_at_a_known_snr(ref):
  sigma = 0.02
  noise = np.random.default_rng(1).standard_normal(ref.shape) * sigma
  m = metrics.signal_metrics(ref, (ref + noise).astype(np.float32))
  # Independent noise of variance σ² per channel: σ²/2 in mid and side.
  mid, side = (ref[:, 0] + ref[:, 1]) / 2, (ref[:, 0] - ref[:, 1]) / 2
  for got, x in ((m['mid_snr'], mid), (m['side_snr'], side)):
    expected = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / sigma**2 * 2)
    assert got == pytest.approx(expected, abs=0.5)


def test_mono_reference_has_no_side_snr():
  mono = np.repeat(stereo()[:, :1], 2, axis=1)
  m = metrics.signal_metrics(mono, mono * np.float32(0.9))
  assert np.isnan(m['side_snr']) and m['mid_snr'] == pytest.approx(20.0)


def test_silent_estimate_scores_as_bad_not_as_perfect(ref):
  m = metrics.signal_metrics(ref, np.zeros_like(ref))
  assert m['ipd_error'] == pytest.approx(np.pi / 2)
  assert m['mid_snr'] == pytest.approx(0.0, abs=1e-3)


def test_bad_shapes_are_refused(ref):
  with pytest.raises(ValueError, match='one shape'):
    metrics.signal_metrics(ref, ref[:-1])
  with pytest.raises(ValueError, match='stereo'):
    metrics.signal_metrics(ref[:, :1], ref[:, :1])


@pytest.mark.parametrize('seconds', [0.5, 1.37, 2.9])
def test_padded_to_a_bucket_the_metrics_are_those_of_the_clip(seconds):
  """Clips padded to a length bucket score what they score unpadded (the
  program of each exact length), within float rounding."""
  ref = stereo(seconds, seed=1)
  # Damaged differently over time, so every frame matters, the last too.
  fade = np.linspace(1.0, 0.2, ref.shape[0], dtype=np.float32)[:, None]
  est = ref * fade + 0.02 * stereo(seconds, seed=2)[:, ::-1]
  got = metrics.signal_metrics(ref, est)
  want = jax.device_get(metrics._signal_metrics(ref, est, SR, None))
  assert got.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_allclose(
      got[name], value, rtol=2e-5, atol=1e-6, err_msg=name
    )


def test_clips_of_one_bucket_share_a_program():
  before = metrics._signal_metrics._cache_size()
  for seconds in (1.01, 1.2, 1.33):  # all padded to 16 × 0.1 s
    metrics.signal_metrics(stereo(seconds), stereo(seconds, seed=3))
  assert metrics._signal_metrics._cache_size() - before <= 1


def test_band_edges():
  bands = metrics.band_matrix(SR)
  assert bands.shape == (1024, 9)
  assert bands.sum(axis=1).max() == 1  # no bin in two bands
  hz = np.arange(1024) * SR / 2048
  lowest = hz[bands[:, 0] > 0]
  assert lowest.min() >= 62.5 / np.sqrt(2) and lowest.max() < 62.5 * np.sqrt(2)


def test_codebook_stats():
  k = 16
  uniform = np.tile(np.arange(k), 4)[:, None]  # every code equally often
  single = np.full((64, 1), 3)
  counts = np.concatenate(
    [metrics.code_counts(uniform, k), metrics.code_counts(single, k)]
  )
  stats = metrics.codebook_stats(counts)
  assert stats['perplexity'] == pytest.approx([k, 1])
  assert stats['usage'] == pytest.approx([1, 1 / k])
  assert stats['entropy_bits'] == pytest.approx([4, 0])
  # Counts of several clips add up; codes are [..., levels].
  codes = np.stack([uniform[:, 0], single[:, 0]], axis=-1).reshape(2, -1, 2)
  np.testing.assert_array_equal(metrics.code_counts(codes, k), counts)
  with pytest.raises(ValueError):
    metrics.code_counts(np.array([[k]]), k)


def test_visqol_identical_swapped_and_noisy(ref):
  needs_visqol()
  best = metrics.visqol(ref, ref)
  assert best > 4.6  # ViSQOL v3 audio mode tops out near 4.73.
  # It hears the mono downmix: a swap is inaudible to it.
  assert metrics.visqol(ref, np.ascontiguousarray(ref[:, ::-1])) == (
    pytest.approx(best, abs=1e-6)
  )
  noisy = ref + np.random.default_rng(2).standard_normal(ref.shape) * 0.05
  assert metrics.visqol(ref, noisy.astype(np.float32)) < best - 0.3
  assert np.isnan(metrics.visqol(ref, np.zeros_like(ref)))


def test_opus_packet_bytes_and_alignment():
  # Two Ogg pages: headers of 19 and 300 (255 + 45) bytes, audio 10 + 20.
  def page(lacing):
    body = bytes(sum(lacing))
    return b'OggS' + bytes(22) + bytes([len(lacing), *lacing]) + body

  ogg = page([19, 255, 45]) + page([10, 20])
  assert opus.packet_bytes(ogg) == 30
  x = stereo(0.2)
  late = np.pad(x, ((7, 0), (0, 0)))[: len(x)]
  assert baselines.best_lag(x, late, 96) == 7
  np.testing.assert_array_equal(baselines.align(late, 7, len(x))[:-7], x[:-7])
  assert baselines.best_lag(x, np.zeros_like(x), 96) == 0


def test_opus_roundtrip():
  tools = opus.find()
  if tools is None:
    pytest.skip('opusenc/opusdec not on PATH (apt-get install opus-tools)')
  t = np.arange(SR) / SR
  x = np.stack(
    [0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], 1
  ).astype(np.float32)
  out = opus.roundtrip(x, 64.0, tools)
  assert out.audio.shape == x.shape and out.audio.dtype == np.float32
  assert out.kbps == pytest.approx(64, rel=0.05)
  assert out.file_kbps > out.kbps
  # Tones survive 64 kbps well, if the output is aligned with the input.
  assert metrics.signal_metrics(x, out.audio)['mid_snr'] > 20


@pytest.fixture(scope='module')
def music():
  """Two seconds of procedural music: notes with harmonics, drums, reverb."""
  return synthetic.render(np.random.default_rng(3), 2 * SR)


@pytest.fixture(scope='module')
def damaged(music):
  return {
    'random_phase': degrade.random_phase(music),
    'blurred': degrade.blur_magnitudes(music),
  }


def test_lsd_sees_a_random_phase_that_a_slight_blur_is_not(music, damaged):
  random = metrics.signal_metrics(music, damaged['random_phase'])
  blurred = metrics.signal_metrics(music, damaged['blurred'])
  # The damage is what it claims: the same level, the envelope roughly kept.
  assert np.std(damaged['random_phase']) == pytest.approx(
    np.std(music), rel=0.1
  )
  assert random['mel_distance'] < 0.4
  # The 4096-point LSD sees the smeared harmonics: far from the reference
  # (0 dB), and far worse than a slight blur that keeps the phase.
  assert random['lsd'] > 6.0
  assert blurred['lsd'] < 4.0
  assert random['lsd'] > 2.5 * blurred['lsd']


def test_visqol_forgives_a_random_phase(music, damaged):
  """The case the LSD exists for: ViSQOL still scores it above 3.5."""
  needs_visqol()
  random = metrics.visqol(music, damaged['random_phase'])
  blurred = metrics.visqol(music, damaged['blurred'])
  assert 3.5 < random < blurred - 0.2
  assert blurred > 4.5

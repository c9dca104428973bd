"""STFT / iSTFT / mel filters against direct numpy definitions."""

import jax
import numpy as np
import pytest

from spectrostream_jax import signal


def naive_stft(x, frame=960, hop=480):
  """Direct transcription of the STFT definition for one channel [T]."""
  n_frames = -(-x.size // hop)
  x = np.concatenate([x, np.zeros(frame - 1)])
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)
  out = np.stack(
    [np.fft.rfft(x[hop * t : hop * t + frame] * w) for t in range(n_frames)]
  )
  return out[:, : frame // 2]


@pytest.mark.parametrize('length', [480, 1000, 4800, 9601])
def test_stft_matches_definition(length):
  rng = np.random.default_rng(length)
  x = rng.uniform(-1, 1, (2, length, 2)).astype(np.float32)
  feat = np.asarray(signal.stft(x))
  assert feat.shape == (2, -(-length // 480), 480, 4)
  for b in range(2):
    for c in range(2):
      ref = naive_stft(x[b, :, c].astype(np.float64))
      np.testing.assert_allclose(feat[b, :, :, 2 * c], ref.real, atol=2e-4)
      np.testing.assert_allclose(feat[b, :, :, 2 * c + 1], ref.imag, atol=2e-4)


def test_round_trip_is_identity_after_first_hop():
  """Band-limited input (no Nyquist energy): exact after sample 480."""
  t = np.arange(48_000) / 48_000
  rng = np.random.default_rng(0)
  freqs = rng.uniform(20, 15_000, 40)
  phases = rng.uniform(0, 2 * np.pi, 40)
  left = sum(
    np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, phases, strict=True)
  )
  right = sum(
    np.cos(3 * np.pi * f * t + p) for f, p in zip(freqs, phases, strict=True)
  )
  x = np.stack([left / 40, right / 60], -1)[None]
  # Fade out so the end padding does not create broadband (Nyquist) content.
  x[0, -4800:] *= np.cos(np.linspace(0, np.pi / 2, 4800))[:, None] ** 2
  x = x.astype(np.float32)
  y = np.asarray(jax.jit(lambda v: signal.istft(signal.stft(v)))(x))
  assert y.shape == x.shape  # 48000 is a multiple of the hop
  np.testing.assert_allclose(y[:, 480:], x[:, 480:], atol=2e-6)
  # The first hop is covered by one frame only and is not reconstructed.
  assert np.max(np.abs(y[:, :480] - x[:, :480])) > 1e-3


def test_istft_keeps_frames_times_hop():
  feat = np.zeros((1, 7, 480, 2), np.float32)
  assert signal.istft(feat).shape == (1, 7 * 480, 1)


def test_synthesis_window_inverts_overlap_add():
  w = signal.hann_window(960)
  s = signal.synthesis_window(960, 480)
  # Analysis × synthesis windows of overlapping frames sum to one.
  np.testing.assert_allclose(w[:480] * s[:480] + w[480:] * s[480:], 1.0)


def test_mel_filterbank():
  fb = signal.mel_filterbank(64, 1024, 48_000)
  assert fb.shape == (513, 64)
  assert np.all(fb >= 0)
  peaks = np.argmax(fb, axis=0)
  assert np.all(np.diff(peaks) >= 0) and peaks[-1] > peaks[0]
  np.testing.assert_allclose(
    signal.mel_to_hz(signal.hz_to_mel([0, 500, 1000, 8000])),
    [0, 500, 1000, 8000],
    rtol=1e-9,
    atol=1e-9,
  )


def test_mel_spectrogram_of_sine_peaks_at_its_frequency():
  t = np.arange(24_000) / 48_000
  x = np.sin(2 * np.pi * 3000 * t)[None, :, None].astype(np.float32)
  mel = np.asarray(signal.mel_spectrogram(x, 48_000, 1024, 256, 64))
  assert mel.shape == (1, 1, 1 + 24_000 // 256, 64)
  fb = signal.mel_filterbank(64, 1024, 48_000)
  expected = np.argmax(fb[round(3000 * 1024 / 48_000)])
  assert np.argmax(mel[0, 0].mean(0)) == expected

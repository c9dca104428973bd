"""Opus, AAC and MP3 through PyAV: rate, alignment, floors, provenance.

PyAV is part of the `eval` extra that the README's test command
installs: when it is missing these tests fail, they do not skip.
"""

import numpy as np
import pytest

from spectrostream_jax.evaluation import baselines
from spectrostream_jax.evaluation import metrics

SR = 48_000
NAMES = tuple(baselines.BASELINES)


@pytest.fixture(scope='module', autouse=True)
def pyav():
  missing = baselines.missing()
  if missing:
    pytest.fail(f"{missing} (the README's test command installs it)")


@pytest.fixture(scope='module')
def tones():
  """One second of two tones, one per channel, with a little noise."""
  t = np.arange(SR) / SR
  rng = np.random.default_rng(0)
  x = np.stack(
    [0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], 1
  )
  return (x + 0.003 * rng.standard_normal(x.shape)).astype(np.float32)


@pytest.mark.parametrize('name', NAMES)
def test_high_rate_roundtrip_is_aligned_and_measured(tones, name):
  out = baselines.roundtrip(tones, 128.0, name)
  assert out.audio.shape == tones.shape and out.audio.dtype == np.float32
  assert out.target_kbps == 128.0 and out.sample_rate == SR
  # The packets' rate, not the request (on one second, the encoder's
  # padding frames add up to 3 %).
  assert out.kbps == pytest.approx(128.0, rel=0.05)
  # Tones survive 128 kbps well only if the delay was removed exactly:
  # one sample off at 660 Hz is already an error 21 dB down.
  m = metrics.signal_metrics(tones, out.audio)
  assert m['mid_snr'] > 22 and m['side_snr'] > 22
  assert out.lag == 0  # The timestamps alone placed it.


@pytest.mark.parametrize('name', NAMES)
def test_a_click_comes_back_where_it_was(name):
  x = np.zeros((SR, 2), np.float32)
  x[20_000] = 0.8
  out = baselines.roundtrip(x, 128.0, name)
  assert int(np.argmax(np.abs(out.audio[:, 0]))) == 20_000


@pytest.mark.parametrize('name', NAMES)
def test_below_its_floor_a_codec_runs_at_its_lowest_rate(tones, name):
  baseline = baselines.BASELINES[name]
  out = baselines.roundtrip(tones, 0.5, name)
  assert out.target_kbps == baseline.min_kbps
  assert out.sample_rate == baseline.sample_rate(baseline.min_kbps)
  # Not silence (Opus's 1.2 kbps keeps a tenth of the level of these
  # tones), and not far over the rate it was asked for.
  rms = np.sqrt(np.mean(np.square(out.audio)))
  assert rms > 0.1 * np.sqrt(np.mean(np.square(tones)))
  assert out.kbps < 1.5 * baseline.min_kbps


def test_rate_table_floor_and_steps():
  mp3, opus = baselines.BASELINES['mp3'], baselines.BASELINES['opus']
  assert [mp3.target(k) for k in (2, 8, 12, 16, 100)] == [8, 8, 8, 16, 96]
  assert [mp3.sample_rate(k) for k in (8, 24, 32, 64, 96)] == [
    8_000,
    8_000,
    12_000,
    24_000,
    SR,
  ]
  assert [opus.target(k) for k in (0.5, 1.0, 6.0)] == [1.0, 1.0, 6.0]
  aac = baselines.BASELINES['aac']
  assert [aac.sample_rate(aac.target(k)) for k in (2, 16, 32)] == [
    8_000,
    16_000,
    SR,
  ]


def test_each_row_names_its_library():
  libs = {name: baselines.library(name) for name in NAMES}
  assert libs['opus'].startswith('libopus 1.')
  assert libs['mp3'].startswith('LAME 3.')
  assert libs['aac'].startswith('FFmpeg aac (libavcodec ')
  for lib in libs.values():
    assert 'PyAV ' in lib and 'FFmpeg ' in lib

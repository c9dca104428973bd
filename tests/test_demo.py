"""`spectrostream demo`: what it streams, and how it counts late frames."""

import argparse
import json

import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax import demo
from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib


@pytest.fixture(scope='module')
def tiny():
  return Codec.random(codec_lib.tiny(), seed=7)


def _wav(samples: int) -> np.ndarray:
  rng = np.random.default_rng(samples)
  t = np.arange(samples) / 48_000
  x = 0.3 * np.sin(2 * np.pi * 330 * t)[:, None] * np.ones(2)
  return (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)


class _Clock:
  """Virtual time: sleeping and the decoder's pushes advance it."""

  def __init__(self):
    self.now, self.calls = 0.0, 0

  def perf_counter(self):
    return self.now

  def sleep(self, seconds):
    self.now += seconds


def _run(codec, x, capsys, tmp_path, **flags):
  args = argparse.Namespace(out=str(tmp_path / 'y.wav'), **flags)
  assert demo.run(codec, 8, x, 48_000, args) == 0
  report = json.loads(capsys.readouterr().out)
  return report, sf.read(args.out, dtype='float32')[0]


@pytest.mark.parametrize('frames_per_step', [1, 3, 4])
def test_streamed_audio_is_the_whole_sequence_decode(
  tiny, capsys, tmp_path, frames_per_step
):
  x = _wav(1920 * 7 + 500)
  report, y = _run(tiny, x, capsys, tmp_path, frames_per_step=frames_per_step)
  # The demo streams zeros after the signal until its last audio is out.
  padded = np.pad(x, ((0, 2 * 1920), (0, 0)))[None]
  want = tiny.decode(tiny.encode(padded, 8))[0, : x.shape[0]]
  assert y.shape == x.shape
  np.testing.assert_allclose(y, want, atol=1e-6)
  # Steps until the codes of 8 frames of signal + 1 of look-ahead are out,
  # and one more for the STFT overhang of the last.
  steps = -(-9 // frames_per_step) + 1
  assert report['frames'] == steps * frames_per_step - frames_per_step
  assert report['frames_per_step'] == frames_per_step
  # Worst case: 2n frames (its step, and the next for the STFT overhang)
  # plus the decoder's look-ahead frame.
  assert report['latency_ms'] == 40.0 * (2 * frames_per_step + 1)
  assert report['latency_ms_measured_max'] >= report['latency_ms']


def test_late_decodes_are_counted_as_dropped(
  tiny, capsys, tmp_path, monkeypatch
):
  """Frame k is in at k·40 ms; a step due 40 ms later that ends after
  that drops its audio frames, and the stream goes on."""
  clock = _Clock()
  monkeypatch.setattr(demo, 'time', clock)
  # Decoder pushes take 10 ms, except step 4's: 90 ms.
  durations = iter([0.01] * 4 + [0.09] + [0.01] * 100)
  push = streaming.StreamingDecoder.push

  def timed_push(self, codes):
    if clock.calls:  # The compile push before the clock starts is free.
      clock.now += next(durations)
    clock.calls += 1
    return push(self, codes)

  monkeypatch.setattr(streaming.StreamingDecoder, 'push', timed_push)
  x = _wav(1920 * 8)
  report, y = _run(tiny, x, capsys, tmp_path, frames_per_step=1)
  # Step k starts when frame k is in, at 40k ms, and is due 40 ms later.
  # Step 4 ends at 250 ms (due 200), step 5 waits for it and ends at 260
  # (due 240); step 6 ends at 270, on time. With one frame of encoder and
  # one of decoder latency, step k outputs audio frame k - 2: frames 2
  # and 3 are late.
  assert report['late_steps'] == 2
  assert report['frames_dropped'] == 2
  assert report['frames_out'] == 8
  assert y.shape == x.shape  # Late frames are still decoded and written.

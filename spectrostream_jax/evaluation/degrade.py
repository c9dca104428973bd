"""Known damage done to a clip, to calibrate what each metric sees.

A metric is only as useful as the faults it can tell apart. These
functions make the faults whose ranking is known: white noise at a given
SNR, a low-pass, blurred magnitudes with the true phase kept (a slight
spectral smear), and the right magnitudes with a random phase (what a
codec that models only the spectral envelope produces: its harmonics
smear into noise). `benchmarks/metric_calibration.py` scores each with
every metric, and the tests check that the fine-resolution log-spectral
distance ranks a random phase far below a slight blur.

All are numpy, on float32 [T, C] clips, and deterministic given `seed`.
"""

import numpy as np

# The STFT the spectral manipulations work in: 2048-point Hann frames,
# 75 % overlap (43 ms at 48 kHz, like a codec's analysis frames).
FRAME = 2048
HOP = 512


def _stft(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
  """[T, C] -> complex [C, frames, frame // 2 + 1], zero-padded ends."""
  pad = np.pad(x.T.astype(np.float64), ((0, 0), (frame, frame + hop)))
  count = (pad.shape[1] - frame) // hop + 1
  index = np.arange(frame)[None, :] + hop * np.arange(count)[:, None]
  window = np.hanning(frame + 1)[:frame]
  return np.fft.rfft(pad[:, index] * window, axis=-1)


def _istft(spec: np.ndarray, length: int, frame: int, hop: int) -> np.ndarray:
  """Inverse of `_stft` by weighted overlap-add: -> float32 [length, C]."""
  window = np.hanning(frame + 1)[:frame]
  frames = np.fft.irfft(spec, frame, axis=-1) * window
  channels, count, _ = frames.shape
  total = frame + hop * (count - 1)
  out = np.zeros((channels, total))
  norm = np.zeros(total)
  for i in range(count):
    out[:, i * hop : i * hop + frame] += frames[:, i]
    norm[i * hop : i * hop + frame] += window**2
  out /= np.maximum(norm, 1e-8)
  return out[:, frame : frame + length].T.astype(np.float32)


def add_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
  """White Gaussian noise `snr_db` below each channel's power."""
  rng = np.random.default_rng(seed)
  power = np.mean(np.square(x, dtype=np.float64), axis=0)
  sigma = np.sqrt(power / 10 ** (snr_db / 10))
  return (x + sigma * rng.standard_normal(x.shape)).astype(np.float32)


def lowpass(x: np.ndarray, cutoff_hz: float, sample_rate: int) -> np.ndarray:
  """Everything above `cutoff_hz` removed (a brick wall over the clip)."""
  spec = np.fft.rfft(x.astype(np.float64), axis=0)
  hz = np.fft.rfftfreq(x.shape[0], 1 / sample_rate)
  spec[hz > cutoff_hz] = 0
  return np.fft.irfft(spec, x.shape[0], axis=0).astype(np.float32)


def random_phase(
  x: np.ndarray, seed: int = 0, frame: int = FRAME, hop: int = HOP
) -> np.ndarray:
  """Each STFT bin keeps its magnitude and gets a random phase.

  One random phase per bin, shared by the channels, so the level
  difference between channels stays as it was. Overlapping frames with
  unrelated phases add up in power, not in amplitude: the output is
  scaled by sqrt(frame / hop) to keep the input's level.
  """
  spec = _stft(x, frame, hop)
  rng = np.random.default_rng(seed)
  phase = np.exp(1j * rng.uniform(-np.pi, np.pi, spec.shape[1:]))
  y = _istft(np.abs(spec) * phase, x.shape[0], frame, hop)
  return (y * np.sqrt(frame / hop)).astype(np.float32)


def blur_magnitudes(
  x: np.ndarray, bins: int = 2, frame: int = FRAME, hop: int = HOP
) -> np.ndarray:
  """Magnitudes smoothed over ±`bins` frequency bins; the phase kept.

  A triangular kernel of half-width bins + 1 (±23 Hz per bin at 48 kHz
  with 2048-point frames): harmonics are widened a little, not lost.
  """
  spec = _stft(x, frame, hop)
  kernel = np.bartlett(2 * bins + 3)[1:-1]
  kernel /= kernel.sum()
  mag = np.abs(spec)
  padded = np.pad(mag, ((0, 0), (0, 0), (bins, bins)), mode='reflect')
  blurred = sum(
    w * padded[..., i : i + mag.shape[-1]] for i, w in enumerate(kernel)
  )
  return _istft(blurred * np.exp(1j * np.angle(spec)), x.shape[0], frame, hop)

"""ITU-R BS.1770-4 loudness in numpy, for normalising training crops.

Crops are levelled to a target loudness (LUFS) rather than a peak or RMS
value because loudness is what listeners, and the codec's perceptual
losses, hear: K-weighting discounts the bass that dominates RMS.

The two K-weighting biquads are applied in the frequency domain on a
zero-padded signal, which equals the standard's recursive filter to
rounding error (the filters' impulse responses die out long before the
padding ends) and keeps the code numpy-only and vectorised, as grain
workers need.
"""

import functools
import math
from typing import NamedTuple

import numpy as np

# Offset of the loudness formula: L = -0.691 + 10·log10(sum_c G_c·z_c).
_OFFSET = -0.691
# Absolute gate and relative gate (LU below the absolute-gated loudness).
_ABSOLUTE_GATE = -70.0
_RELATIVE_GATE = -10.0
_BLOCK_SECONDS = 0.4
_HOP_SECONDS = 0.1
# Zero padding after the signal, in seconds: the K-weighting impulse
# response falls below 1e-10 of its peak well within it at any rate.
_TAIL_SECONDS = 0.1


class Loudness(NamedTuple):
  """Gated integrated loudness (BS.1770) and ungated mean loudness, LUFS."""

  integrated: float
  ungated: float


def k_weighting_coefficients(
  sample_rate: int,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """(b, a) of the pre-filter (high shelf) and the RLB high-pass.

  The analogue prototypes are those of libebur128, so the coefficients at
  48 kHz are the ones tabulated in BS.1770-4 and other rates get the same
  response.
  """
  k = math.tan(math.pi * 1681.974450955533 / sample_rate)
  q = 0.7071752369554196
  vh = 10.0 ** (3.999843853973347 / 20.0)
  vb = vh**0.4996667741545416
  a0 = 1.0 + k / q + k * k
  shelf_b = np.array(
    [(vh + vb * k / q + k * k), 2.0 * (k * k - vh), (vh - vb * k / q + k * k)]
  )
  shelf = (
    shelf_b / a0,
    np.array([a0, 2 * (k * k - 1), 1 - k / q + k * k]) / a0,
  )
  k = math.tan(math.pi * 38.13547087602444 / sample_rate)
  q = 0.5003270373238773
  a0 = 1.0 + k / q + k * k
  highpass_a = np.array([a0, 2 * (k * k - 1), 1 - k / q + k * k]) / a0
  return shelf, (np.array([1.0, -2.0, 1.0]), highpass_a)


@functools.lru_cache(maxsize=16)
def _response(sample_rate: int, fft_size: int) -> np.ndarray:
  """K-weighting frequency response on the rfft bins of `fft_size`."""
  z_inv = np.exp(-2j * np.pi * np.fft.rfftfreq(fft_size))
  powers = np.stack([np.ones_like(z_inv), z_inv, z_inv * z_inv])
  response = np.ones_like(z_inv)
  for b, a in k_weighting_coefficients(sample_rate):
    response *= (b @ powers) / (a @ powers)
  return response


@functools.lru_cache(maxsize=64)
def fft_size(n: int) -> int:
  """Smallest 2^a·3^b·5^c >= n: a length numpy's FFT handles fast."""
  best = 1 << max(n - 1, 0).bit_length()
  threes = 1
  while threes < best:
    product = threes
    while product < best:
      candidate = product
      while candidate < n:
        candidate *= 2
      best = min(best, candidate)
      product *= 5
    threes *= 3
  return best


def k_weight(x: np.ndarray, sample_rate: int) -> np.ndarray:
  """K-weighted signal [T, C] (float64), as by the standard's filters."""
  n = x.shape[0]
  size = fft_size(n + int(_TAIL_SECONDS * sample_rate))
  spectrum = np.fft.rfft(x.astype(np.float64), size, axis=0)
  spectrum *= _response(sample_rate, size)[:, None]
  return np.fft.irfft(spectrum, size, axis=0)[:n]


def _to_lufs(power: np.ndarray | float) -> np.ndarray | float:
  with np.errstate(divide='ignore'):
    return _OFFSET + 10.0 * np.log10(power)


def measure(x: np.ndarray, sample_rate: int) -> Loudness:
  """Loudness of `x` [T, C] (all channel weights 1: mono or stereo).

  `integrated` is BS.1770-4 gated loudness over 400 ms blocks with 75 %
  overlap (a signal shorter than one block is one block); it is -inf when
  every block is below the -70 LUFS gate. `ungated` is the loudness of the
  whole K-weighted signal, which is what a silence threshold should see.
  """
  z = k_weight(x, sample_rate) ** 2
  block = int(round(_BLOCK_SECONDS * sample_rate))
  hop = int(round(_HOP_SECONDS * sample_rate))
  n = z.shape[0]
  ungated = float(_to_lufs(float(np.sum(np.mean(z, axis=0)))))
  if n <= block:
    return Loudness(ungated, ungated)
  cumulative = np.concatenate([np.zeros((1, z.shape[1])), np.cumsum(z, 0)])
  starts = np.arange(0, n - block + 1, hop)
  power = np.sum(cumulative[starts + block] - cumulative[starts], axis=1)
  power /= block
  kept = power[_to_lufs(power) > _ABSOLUTE_GATE]
  if kept.size == 0:
    return Loudness(-math.inf, ungated)
  relative = _to_lufs(np.mean(kept)) + _RELATIVE_GATE
  kept = kept[_to_lufs(kept) > relative]
  return Loudness(float(_to_lufs(np.mean(kept))), ungated)

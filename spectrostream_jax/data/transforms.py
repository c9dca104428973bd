"""From a raw chunk of any source to one clean training crop.

Every source hands over a `Chunk`: audio at its own rate and channel
count, a little longer than the crop so the resampler has context on both
sides. `finish` turns it into the model's input: the configured rate and
channel count, exactly `crop_samples` long, levelled to a random loudness
around the target, finite, not silent. A chunk that cannot give such a
crop raises `CropError`; the caller then draws another item, so a transform
never returns a bad example and never returns nothing.

Everything here is numpy (plus soxr) and picklable: it runs inside grain's
spawned worker processes.
"""

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import soxr

from spectrostream_jax import channels
from spectrostream_jax.data import loudness

# Reasons a chunk is dropped while the pipeline runs; batches count them
# per example in this order (`skips[:, i]`).
RUNTIME_REASONS = (
  'missing',
  'unreadable',
  'too_short',
  'non_finite',
  'silent_crop',
)
# Context read on each side of a crop that must be resampled, in seconds.
RESAMPLE_MARGIN_SECONDS = 0.01


class CropError(Exception):
  """An item that gives no usable crop; `reason` is in RUNTIME_REASONS."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class AudioConfig:
  """What a training crop looks like. Defaults: the 48 kHz stereo codec."""

  sample_rate: int = 48_000
  num_channels: int = 2
  # 1.28 s plus one 40 ms codec frame.
  crop_samples: int = 63_360
  # Inputs with more than two channels: 'downmix' (ITU-style matrix for
  # the WAVE channel order) or 'first_two'.
  channel_mode: str = 'downmix'
  target_lufs: float = -20.0
  # Loudness is drawn uniformly from target_lufs ± gain_db.
  gain_db: float = 6.0
  # Crops whose peak would exceed this after the gain are scaled down.
  max_peak: float = 0.99
  # Crops quieter than this (ungated, K-weighted) are dropped as silent.
  silence_lufs: float = -55.0
  # Files below this rate are not used; 0 keeps every rate.
  min_sample_rate: int = 0

  def __post_init__(self):
    if self.num_channels not in (1, 2):
      raise ValueError(f'num_channels must be 1 or 2, not {self.num_channels}')
    if self.channel_mode not in channels.CHANNEL_MODES:
      raise ValueError(
        f'channel_mode {self.channel_mode!r} not in {channels.CHANNEL_MODES}'
      )
    if self.crop_samples <= 0 or self.sample_rate <= 0:
      raise ValueError('crop_samples and sample_rate must be positive')
    if self.gain_db < 0 or not 0 < self.max_peak <= 1:
      raise ValueError('gain_db must be >= 0 and max_peak in (0, 1]')

  @property
  def crop_seconds(self) -> float:
    return self.crop_samples / self.sample_rate

  def source_frames(self, sample_rate: int) -> int:
    """Frames of a `sample_rate` source that make one crop."""
    if sample_rate == self.sample_rate:
      return self.crop_samples
    return math.ceil(self.crop_samples * sample_rate / self.sample_rate) + 1


class Chunk(NamedTuple):
  """Source audio [N, C] at `sample_rate`; the crop starts at `lead`."""

  audio: np.ndarray
  sample_rate: int
  lead: int


def crop_window(
  total: int, start: int, config: AudioConfig, sample_rate: int
) -> tuple[int, int, int]:
  """(read_start, read_stop, lead) to read a crop starting at `start`.

  Adds up to RESAMPLE_MARGIN_SECONDS of context on each side when the
  source must be resampled, clamped to [0, total).
  """
  need = config.source_frames(sample_rate)
  margin = 0
  if sample_rate != config.sample_rate:
    margin = math.ceil(RESAMPLE_MARGIN_SECONDS * sample_rate)
  read_start = max(0, start - margin)
  read_stop = min(total, start + need + margin)
  return read_start, read_stop, start - read_start


def resample_crop(chunk: Chunk, config: AudioConfig) -> np.ndarray:
  """The crop at the target rate: exactly `crop_samples` frames."""
  x, rate, lead = chunk
  if rate != config.sample_rate:
    x = soxr.resample(x, rate, config.sample_rate)
    lead = round(lead * config.sample_rate / rate)
  x = x[lead : lead + config.crop_samples]
  if x.shape[0] < config.crop_samples:
    raise CropError(
      'too_short', f'{x.shape[0]} < {config.crop_samples} samples'
    )
  return x


def finish(
  chunk: Chunk, config: AudioConfig, rng: np.random.Generator
) -> np.ndarray:
  """Chunk -> crop float32 [crop_samples, num_channels], or raises CropError."""
  x = np.asarray(chunk.audio, np.float32)
  if x.ndim == 1:
    x = x[:, None]
  x = channels.to_channels(x, config.num_channels, config.channel_mode)
  x = resample_crop(chunk._replace(audio=x), config)
  if not np.all(np.isfinite(x)):
    raise CropError('non_finite')
  level = loudness.measure(x, config.sample_rate)
  # A click outside every 400 ms block can pass the ungated test alone.
  if level.ungated < config.silence_lufs or level.integrated == -math.inf:
    raise CropError('silent_crop', f'{level.ungated:.1f} LUFS')
  target = config.target_lufs + rng.uniform(-config.gain_db, config.gain_db)
  gain = 10.0 ** ((target - level.integrated) / 20.0)
  peak = float(np.max(np.abs(x))) * gain
  if peak > config.max_peak:
    gain *= config.max_peak / peak
  return (x * gain).astype(np.float32)

"""STFT, inverse STFT and mel filters (docs/architecture.md, "The model").

The analysis is causal at frame level: frame t covers samples
[hop·t, hop·t + frame) and the signal is zero-padded at the end only, so
analysis followed by synthesis has no time shift. Everything here is pure
`jnp` and works under `jit` on any backend; `per_device` runs a transform
of a batch split over devices on each device's own examples.
"""

from collections.abc import Callable
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def hann_window(length: int) -> np.ndarray:
  """Periodic Hann window, float64 (cast at use)."""
  n = np.arange(length)
  return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)


@functools.cache
def synthesis_window(frame_length: int, hop_length: int) -> np.ndarray:
  """Window w / sum_k w²[n + k·hop] that makes overlap-add invert analysis."""
  w = hann_window(frame_length)
  denom = np.zeros(frame_length)
  for shift in range(-frame_length, frame_length + 1, hop_length):
    idx = np.arange(frame_length) + shift
    valid = (idx >= 0) & (idx < frame_length)
    denom[valid] += w[idx[valid]] ** 2
  return w / denom


def per_device(
  fn: Callable[..., Any], batch: jax.sharding.NamedSharding | None
) -> Callable[..., Any]:
  """`fn` run by each device on its own examples of a split batch.

  XLA's partitioner does not split an FFT: on a batch split over devices
  it gathers the whole batch and every device transforms all of it.
  Under `shard_map` each device transforms only its rows. `batch` is the
  sharding of the batch (axis 0 of every argument and result of `fn`);
  None, or a batch that is not split, returns `fn` itself.
  """
  if batch is None or batch.is_fully_replicated:
    return fn
  return jax.shard_map(
    fn, mesh=batch.mesh, in_specs=batch.spec, out_specs=batch.spec
  )


def num_frames(num_samples: int, hop_length: int = 480) -> int:
  return math.ceil(num_samples / hop_length)


def bucket(n: int, smallest: int = 16) -> int:
  """The smallest of `smallest`·(1, 1.5, 2, 3, 4, 6, ...) that is ≥ n.

  Padding to these sizes costs at most half the work (a fifth on
  average) and bounds the programs that inputs of many sizes compile to
  two per doubling. `smallest` must be even.
  """
  size, power_of_two = smallest, True
  while size < n:
    size = size * 3 // 2 if power_of_two else size * 4 // 3
    power_of_two = not power_of_two
  return size


def frame(x: jax.Array, frame_length: int, hop_length: int) -> jax.Array:
  """[..., T] -> [..., ceil(T/hop), frame], zero-padded at the end."""
  if frame_length % hop_length:
    raise ValueError('frame_length must be a multiple of hop_length')
  per = frame_length // hop_length
  t = x.shape[-1]
  frames = num_frames(t, hop_length)
  total = (frames + per - 1) * hop_length
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, total - t)])
  blocks = x.reshape(*x.shape[:-1], frames + per - 1, hop_length)
  return jnp.concatenate(
    [blocks[..., i : i + frames, :] for i in range(per)], axis=-1
  )


def stft(
  wav: jax.Array, frame_length: int = 960, hop_length: int = 480
) -> jax.Array:
  """Waveform [B, T, C] -> features [B, ceil(T/hop), frame/2, 2C].

  Channels are interleaved [re_0, im_0, re_1, im_1, ...]; the Nyquist bin is
  dropped, DC is kept.
  """
  x = jnp.moveaxis(wav, -1, 1)  # [B, C, T]
  frames = frame(x, frame_length, hop_length)
  window = jnp.asarray(hann_window(frame_length), wav.dtype)
  spec = jnp.fft.rfft(frames * window, axis=-1)[..., : frame_length // 2]
  feat = jnp.stack([spec.real, spec.imag], axis=-1)  # [B, C, F, K, 2]
  b, c, f, k, _ = feat.shape
  feat = jnp.transpose(feat, (0, 2, 3, 1, 4)).reshape(b, f, k, 2 * c)
  return feat.astype(wav.dtype)


def synthesis_frames(
  features: jax.Array, frame_length: int = 960, hop_length: int = 480
) -> jax.Array:
  """Features [B, F, frame/2, 2C] -> windowed frames [B, F, per, hop, C].

  `per` = frame/hop parts of each frame; overlap-add sums part i of frame
  j - i into output block j.
  """
  b, f, k, c2 = features.shape
  c = c2 // 2
  feat = features.reshape(b, f, k, c, 2)
  spec = jax.lax.complex(feat[..., 0], feat[..., 1])  # [B, F, K, C]
  spec = jnp.pad(spec, ((0, 0), (0, 0), (0, 1), (0, 0)))  # zero Nyquist bin
  frames = jnp.fft.irfft(spec, n=frame_length, axis=2)  # [B, F, frame, C]
  window = synthesis_window(frame_length, hop_length)
  frames = frames * jnp.asarray(window, features.dtype)[:, None]
  per = frame_length // hop_length
  return frames.reshape(b, f, per, hop_length, c)


def overlap_add(
  parts: jax.Array, carry: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Parts [B, F, per, hop, C] -> (blocks [B, F·hop, C], new carry).

  `carry` [B, per - 1, hop, C] holds what earlier frames add to the first
  per - 1 blocks (zeros at the start of a signal); the new carry is what
  these frames add past their last block.
  """
  b, f, per, hop, c = parts.shape
  # Block j of the padded range sums part i of frame j - i.
  padded = jnp.zeros((b, f + per - 1, hop, c), parts.dtype)
  for i in range(per):
    padded = padded.at[:, i : i + f].add(parts[:, :, i])
  if carry is not None:
    padded = padded.at[:, : per - 1].add(carry)
  out = padded[:, :f].reshape(b, f * hop, c)
  return out, padded[:, f:]


def istft(
  features: jax.Array, frame_length: int = 960, hop_length: int = 480
) -> jax.Array:
  """Features [B, F, frame/2, 2C] -> waveform [B, F·hop, C]."""
  parts = synthesis_frames(features, frame_length, hop_length)
  return overlap_add(parts)[0].astype(features.dtype)


def hz_to_mel(hz):
  """Slaney mel scale (linear below 1 kHz, logarithmic above)."""
  hz = np.asarray(hz, np.float64)
  f_sp = 200.0 / 3
  min_log_hz = 1000.0
  logstep = np.log(6.4) / 27.0
  mel = hz / f_sp
  log_part = min_log_hz / f_sp + np.log(np.maximum(hz, 1e-10) / min_log_hz) / (
    logstep
  )
  return np.where(hz >= min_log_hz, log_part, mel)


def mel_to_hz(mel):
  mel = np.asarray(mel, np.float64)
  f_sp = 200.0 / 3
  min_log_mel = 1000.0 / f_sp
  logstep = np.log(6.4) / 27.0
  return np.where(
    mel >= min_log_mel,
    1000.0 * np.exp(logstep * (mel - min_log_mel)),
    f_sp * mel,
  )


@functools.cache
def mel_filterbank(
  num_mels: int,
  fft_length: int,
  sample_rate: int,
  fmin: float = 0.0,
  fmax: float | None = None,
) -> np.ndarray:
  """Slaney-normalised triangular filters, [fft_length // 2 + 1, num_mels]."""
  fmax = sample_rate / 2 if fmax is None else fmax
  fft_hz = np.linspace(0.0, sample_rate / 2, fft_length // 2 + 1)
  mel_hz = mel_to_hz(
    np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mels + 2)
  )
  lower = (fft_hz[:, None] - mel_hz[None, :-2]) / np.diff(mel_hz)[None, :-1]
  upper = (mel_hz[None, 2:] - fft_hz[:, None]) / np.diff(mel_hz)[None, 1:]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[None, :]
  return weights.astype(np.float32)


def magnitude_spectrogram(
  wav: jax.Array,
  window: int,
  hop: int,
  power: float = 1.0,
  length: jax.Array | None = None,
) -> jax.Array:
  """|STFT| of [B, T, C] with a centred periodic Hann window: [B, C, F, K].

  `length`: how many samples of wav are the signal (a traced scalar, so
  that one program serves every length up to T). The signal is reflected
  at its own end, as it would be if it were `length` long, and frames
  from `valid_frames(length, hop)` on are to be ignored.
  """
  x = jnp.moveaxis(wav, -1, 1)
  pad = window // 2
  if length is None:
    x = jnp.pad(x, ((0, 0), (0, 0), (pad, pad)), mode='reflect')
  else:
    i = jnp.abs(jnp.arange(x.shape[-1] + 2 * pad) - pad)
    i = jnp.where(i > length - 1, 2 * (length - 1) - i, i)
    x = jnp.take(x, jnp.clip(i, 0, x.shape[-1] - 1), axis=-1)
  n = 1 + (x.shape[-1] - window) // hop
  frames = frame(x, window, hop)[..., :n, :]
  frames = frames * jnp.asarray(hann_window(window), wav.dtype)
  mag = jnp.abs(jnp.fft.rfft(frames, axis=-1))
  return mag if power == 1.0 else mag**power


def valid_frames(length: jax.Array, hop: int, frames: int) -> jax.Array:
  """bool [frames]: the centred frames of a `length`-sample signal."""
  return jnp.arange(frames) < 1 + length // hop


def mel_spectrogram(
  wav: jax.Array,
  sample_rate: int,
  window: int,
  hop: int,
  num_mels: int = 64,
  length: jax.Array | None = None,
) -> jax.Array:
  """Magnitude mel spectrogram [B, C, frames, num_mels] for losses/metrics.

  `length`: as in `magnitude_spectrogram`.
  """
  mag = magnitude_spectrogram(wav, window, hop, length=length)
  fb = jnp.asarray(mel_filterbank(num_mels, window, sample_rate), wav.dtype)
  return mag @ fb

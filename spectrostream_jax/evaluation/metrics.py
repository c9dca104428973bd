"""Quality metrics of a decoded clip against its reference.

`signal_metrics` compares two float32 [T, 2] clips of equal length at
48 kHz in one jitted call: mel and multi-scale STFT distance, SI-SDR, mid
and side SNR, and the stereo image per octave band (level difference,
phase difference and coherence between the channels). `visqol` scores a
pair with ViSQOL v3 (audio mode, on the mono downmix); it needs no JAX,
so the ladder runs it in worker processes. `codebook_stats` summarises
RVQ codes. docs/evaluation.md gives
every formula.
"""

from collections.abc import Sequence
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import losses
from spectrostream_jax import signal

# Octave bands of the stereo image: centres 62.5 Hz .. 16 kHz, edges at
# centre / √2 and centre · √2 (44 Hz .. 22.6 kHz).
BAND_CENTRES_HZ = tuple(62.5 * 2**i for i in range(9))
STFT_WINDOWS = (64, 128, 256, 512, 1024, 2048)
# Stereo image analysis: STFT frame and hop, and frames per tile (85 ms).
STEREO_FRAME = 2048
STEREO_HOP = 512
STEREO_TILE_FRAMES = 8
# A tile counts when its reference energy is within this of the loudest
# tile of the clip; a side channel this far below the mid is "mono".
ACTIVE_DB = 60.0
# Level differences saturate here: beyond it one channel is inaudible.
MAX_ILD_DB = 30.0
# The fine-resolution log-spectral distance: a 4096-point STFT (85 ms
# frames, 11.7 Hz bins) resolves the harmonics of any pitched note, and
# levels more than LSD_FLOOR_DB below the clip's loudest bin count as that.
LSD_FRAME = 4096
LSD_HOP = 1024
LSD_FLOOR_DB = 80.0
_EPS = 1e-12
# Stored per clip as lists, one value per band, next to their mean.
BAND_METRICS = ('ild_error', 'ipd_error', 'icc_error')
SCALAR_METRICS = (
  'mel_distance',
  'stft_distance',
  'lsd',
  'si_sdr',
  'mid_snr',
  'side_snr',
  *BAND_METRICS,
)


def stft_distance(
  reference: jax.Array,
  estimate: jax.Array,
  windows: Sequence[int] = STFT_WINDOWS,
  hops_per_window: int = 4,
  log_eps: float = 1e-5,
  length: jax.Array | None = None,
) -> jax.Array:
  """Mean |log10(|S| + eps) − log10(|Ŝ| + eps)| over scales, per example.

  `losses.mel_distance` on linear-frequency STFT bins instead of mel
  bands, so the top octaves, where most bins lie, weigh as much as they
  do in the spectrum. [B, T, C] signals -> [B]. `length`: see
  signal.magnitude_spectrogram.
  """
  both = jnp.concatenate([reference, estimate]).astype(jnp.float32)
  per_scale = []
  for window in windows:
    hop = window // hops_per_window
    mag = signal.magnitude_spectrogram(both, window, hop, length=length)
    s, s_hat = jnp.split(mag, 2)
    diff = jnp.abs(jnp.log10(s + log_eps) - jnp.log10(s_hat + log_eps))
    per_scale.append(losses.frame_mean(diff, hop, length))
  return jnp.mean(jnp.stack(per_scale), axis=0)


def log_spectral_distance(
  reference: jax.Array,
  estimate: jax.Array,
  frame_length: int = LSD_FRAME,
  hop_length: int = LSD_HOP,
  floor_db: float = LSD_FLOOR_DB,
  length: jax.Array | None = None,
) -> jax.Array:
  """RMS over bins of the dB difference of power spectra, in dB, per example.

  With P, P̂ the power spectrograms (4096-point Hann STFT), both clamped
  to floor_db below the reference's loudest bin, the distance of a frame
  is sqrt(mean over bins of (10 log10 P − 10 log10 P̂)²); the result is
  its mean over channels and active frames (those within ACTIVE_DB of
  the loudest frame). Its bins are narrow enough to see each harmonic
  and the valleys between them, so noise with the right spectral
  envelope, or harmonics smeared by a random phase, cannot pass for the
  reference as they can in coarser spectra. [B, T, C] -> [B]. `length`:
  see signal.magnitude_spectrogram.
  """
  both = jnp.concatenate([reference, estimate]).astype(jnp.float32)
  power = signal.magnitude_spectrogram(
    both, frame_length, hop_length, 2.0, length
  )
  if length is not None:  # Frames past the signal: silent, so inactive.
    valid = signal.valid_frames(length, hop_length, power.shape[2])
    power = jnp.where(valid[None, None, :, None], power, 0.0)
  p, p_hat = jnp.split(power, 2)  # [B, C, F, K]
  floor = 10 ** (-floor_db / 10) * jnp.max(p, axis=(1, 2, 3), keepdims=True)
  db = 10.0 * jnp.log10(jnp.maximum(p, floor))
  db_hat = 10.0 * jnp.log10(jnp.maximum(p_hat, floor))
  per_frame = jnp.sqrt(jnp.mean(jnp.square(db - db_hat), axis=-1))
  energy = jnp.sum(p, axis=(1, 3))  # [B, F]
  active = energy > 10 ** (-ACTIVE_DB / 10) * jnp.max(
    energy, axis=1, keepdims=True
  )
  weight = active[:, None, :].astype(per_frame.dtype)
  return jnp.sum(per_frame * weight, axis=(1, 2)) / (
    per_frame.shape[1] * jnp.sum(weight[:, 0], axis=1)
  )


def _snr(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """10 log10(Σx² / Σ(x − x̂)²) over time, [B, T] -> [B]."""
  signal_energy = jnp.sum(jnp.square(x), axis=-1)
  noise_energy = jnp.sum(jnp.square(x - x_hat), axis=-1)
  return 10.0 * jnp.log10((signal_energy + _EPS) / (noise_energy + _EPS))


def mid_side_snr(
  reference: jax.Array, estimate: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """SNR in dB of mid (L + R) / 2 and side (L − R) / 2, per example.

  Not scale-invariant: a level error is an error. The side SNR is NaN
  when the reference side is more than ACTIVE_DB below its mid (a mono
  reference has no side to reproduce).
  """
  ref, est = reference.astype(jnp.float32), estimate.astype(jnp.float32)
  mid, side = _mid_side(ref)
  mid_hat, side_hat = _mid_side(est)
  side_snr = _snr(side, side_hat)
  mono = jnp.sum(jnp.square(side), -1) < 10 ** (-ACTIVE_DB / 10) * jnp.sum(
    jnp.square(mid), -1
  )
  return _snr(mid, mid_hat), jnp.where(mono, jnp.nan, side_snr)


def _mid_side(wav: jax.Array) -> tuple[jax.Array, jax.Array]:
  left, right = wav[..., 0], wav[..., 1]
  return (left + right) / 2, (left - right) / 2


@functools.cache
def band_matrix(
  sample_rate: int,
  frame_length: int = STEREO_FRAME,
  centres: Sequence[float] = BAND_CENTRES_HZ,
) -> np.ndarray:
  """0/1 [frame/2, bands]: which STFT bin (Nyquist dropped) is in which band."""
  hz = np.arange(frame_length // 2) * sample_rate / frame_length
  centres = np.asarray(centres)
  lo, hi = centres / math.sqrt(2), centres * math.sqrt(2)
  return ((hz[:, None] >= lo) & (hz[:, None] < hi)).astype(np.float32)


def _tiles(
  wav: jax.Array, sample_rate: int, length: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(P_L, P_R, X) per tile [B, tiles, bands]: powers and cross-spectrum.

  A tile is STEREO_TILE_FRAMES STFT frames times one band's bins;
  X = Σ L·conj(R) over the tile. The last tile, if incomplete, is left
  out; with `length` (wav is zero after that many samples), so are the
  tiles from there on: they are zero.
  """
  feat = signal.stft(wav.astype(jnp.float32), STEREO_FRAME, STEREO_HOP)
  spec = jax.lax.complex(feat[..., 0::2], feat[..., 1::2])  # [B, F, K, C]
  b, f, k, _ = spec.shape
  n = f // STEREO_TILE_FRAMES
  if n == 0:
    raise ValueError(
      f'clip too short for the stereo metrics: {wav.shape[1]} samples'
    )
  spec = spec[:, : n * STEREO_TILE_FRAMES].reshape(
    b, n, STEREO_TILE_FRAMES, k, 2
  )
  if length is not None:
    whole = (length + STEREO_HOP - 1) // STEREO_HOP // STEREO_TILE_FRAMES
    spec = jnp.where(
      (jnp.arange(n) < whole)[None, :, None, None, None], spec, 0
    )
  left, right = spec[..., 0], spec[..., 1]
  bands = jnp.asarray(band_matrix(sample_rate))

  def per_band(x):
    return jnp.einsum('bnfk,kj->bnj', x, bands.astype(x.dtype))

  return (
    per_band(jnp.square(jnp.abs(left))),
    per_band(jnp.square(jnp.abs(right))),
    per_band(left * jnp.conj(right)),
  )


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over tiles (axis 1) where mask; NaN where no tile is active."""
  return jnp.sum(jnp.where(mask, x, 0.0), axis=1) / jnp.sum(mask, axis=1)


def stereo_image(
  reference: jax.Array,
  estimate: jax.Array,
  sample_rate: int = 48_000,
  length: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Per-band stereo image errors [B, bands] of [B, T, 2] signals.

  With P_L, P_R the channel powers and X = Σ L·conj(R) of a tile:
  ILD = 10 log10(P_L / P_R) clipped to ±MAX_ILD_DB, IPD = arg X and
  ICC = |X| / sqrt(P_L P_R). `ild_error` and `icc_error` are mean
  absolute differences over the active tiles (dB and 0..1);
  `ipd_error` is |arg(X·conj(X̂))| in radians (π/2 where X̂ = 0),
  averaged with weights |X| so that tiles where the channels share
  nothing do not count. `length`: see `_tiles`.
  """
  pl, pr, x = _tiles(reference, sample_rate, length)
  ql, qr, y = _tiles(estimate, sample_rate, length)
  energy = pl + pr
  peak = jnp.max(energy, axis=(1, 2), keepdims=True)
  eps = 1e-10 * peak + _EPS
  active = energy > 10 ** (-ACTIVE_DB / 10) * peak

  def ild(a, b):
    level = 10.0 * jnp.log10((a + eps) / (b + eps))
    return jnp.clip(level, -MAX_ILD_DB, MAX_ILD_DB)

  def icc(a, b, cross):
    return jnp.abs(cross) / jnp.sqrt(a * b + eps * eps)

  weight = jnp.abs(x)
  # Where the estimate has no cross-spectrum its phase is undefined: it
  # counts as a random phase would on average, π/2.
  phase = jnp.where(
    jnp.abs(y) > eps, jnp.abs(jnp.angle(x * jnp.conj(y))), jnp.pi / 2
  )
  return {
    'ild_error': _masked_mean(jnp.abs(ild(pl, pr) - ild(ql, qr)), active),
    'ipd_error': jnp.sum(weight * phase, axis=1) / jnp.sum(weight, axis=1),
    'icc_error': _masked_mean(jnp.abs(icc(pl, pr, x) - icc(ql, qr, y)), active),
  }


@functools.partial(jax.jit, static_argnums=2)
def _signal_metrics(
  reference: jax.Array, estimate: jax.Array, sample_rate: int, length
) -> dict[str, jax.Array]:
  ref, est = reference[None], estimate[None]
  mid, side = mid_side_snr(ref, est)
  out = {
    'mel_distance': losses.mel_distance(
      ref, est, losses.MelConfig(sample_rate=sample_rate), length=length
    ),
    'stft_distance': stft_distance(ref, est, length=length),
    'lsd': log_spectral_distance(ref, est, length=length),
    'si_sdr': losses.si_sdr(ref, est, length=length),
    'mid_snr': mid,
    'side_snr': side,
  }
  for name, per_band in stereo_image(ref, est, sample_rate, length).items():
    out[f'{name}_bands'] = per_band
    out[name] = jnp.nanmean(per_band, axis=-1)
  return {k: v[0] for k, v in out.items()}


# Clips are zero-padded to a whole number of these (0.1 s at 48 kHz), in
# `signal.bucket` steps, so that clips of many lengths share a few programs.
_BUCKET_UNIT = 4800


def signal_metrics(
  reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 48_000
) -> dict[str, Any]:
  """Every metric but ViSQOL of float32 [T, 2] clips of equal shape.

  Returns floats for SCALAR_METRICS and, for each name in BAND_METRICS,
  `{name}_bands`: a list with one value per band of BAND_CENTRES_HZ.
  NaN marks a value that does not exist (a silent band, a mono side).
  The clips are zero-padded to a length bucket and the metrics told
  their length: the values are those of the clips as they are, within
  float rounding, from one program per bucket (docs/evaluation.md).
  """
  reference = np.asarray(reference, np.float32)
  estimate = np.asarray(estimate, np.float32)
  if reference.shape != estimate.shape or reference.ndim != 2:
    raise ValueError(
      f'need two [T, 2] clips of one shape, got {reference.shape} and '
      f'{estimate.shape}'
    )
  if reference.shape[1] != 2:
    raise ValueError(f'need stereo clips, got {reference.shape[1]} channels')
  t = reference.shape[0]
  if signal.num_frames(t, STEREO_HOP) < STEREO_TILE_FRAMES:
    raise ValueError(f'clip too short for the stereo metrics: {t} samples')
  if t <= LSD_FRAME // 2:
    raise ValueError(f'clip too short for the spectral metrics: {t} samples')
  padded = signal.bucket(math.ceil(t / _BUCKET_UNIT)) * _BUCKET_UNIT
  pad = ((0, padded - t), (0, 0))
  out = jax.device_get(
    _signal_metrics(
      np.pad(reference, pad), np.pad(estimate, pad), sample_rate, np.int32(t)
    )
  )
  return {
    k: [float(x) for x in v] if np.ndim(v) else float(v) for k, v in out.items()
  }


# ViSQOL ---------------------------------------------------------------------


def visqol_missing() -> str | None:
  """Why ViSQOL cannot run here, or None when it can."""
  try:
    import visqol  # noqa: F401
  except ImportError as e:
    return f'visqol-python is not installed ({e}); pip install ".[eval]"'
  return None


@functools.cache
def _visqol_api():
  import visqol

  api = visqol.VisqolApi()
  api.create(mode='audio')
  return api


def visqol(
  reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 48_000
) -> float:
  """ViSQOL v3 audio-mode MOS-LQO (1 .. ~4.73) of the mono downmixes.

  Audio mode compares mono signals: stereo clips are averaged over
  channels first, as ViSQOL itself does, so it is blind to the stereo
  image. NaN for a silent estimate, which ViSQOL cannot score. Numba
  runs on one thread: with more, its parallel reductions change the
  last digits from run to run.
  """
  try:
    import numba

    numba.set_num_threads(1)
  except ImportError:
    pass  # visqol-python then runs its (slower, identical) numpy code.
  ref = np.asarray(reference, np.float64).reshape(reference.shape[0], -1)
  est = np.asarray(estimate, np.float64).reshape(estimate.shape[0], -1)
  if not np.any(est):
    return math.nan  # Its level matching divides by zero.
  result = _visqol_api().measure_from_arrays(
    ref.mean(axis=1), est.mean(axis=1), sample_rate
  )
  return float(result.moslqo)


# Codebooks ------------------------------------------------------------------


def code_counts(codes: np.ndarray, codebook_size: int) -> np.ndarray:
  """How often each code is used per level: int64 [levels, codebook_size].

  `codes` is [..., levels]; counts of several clips add up.
  """
  codes = np.asarray(codes).reshape(-1, np.shape(codes)[-1])
  if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
    raise ValueError(f'codes outside [0, {codebook_size})')
  return np.stack(
    [np.bincount(c, minlength=codebook_size) for c in codes.T.astype(np.int64)]
  )


def codebook_stats(counts: np.ndarray) -> dict[str, list[float]]:
  """Per level: usage (share of entries used), entropy (bits), perplexity.

  Perplexity is 2^entropy of the code distribution: the codebook size
  when every code is equally likely, 1 when one code is always chosen.
  """
  counts = np.asarray(counts, np.float64)
  p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  logp = np.log2(np.where(p > 0, p, 1.0))
  entropy = -np.sum(p * logp, axis=1)
  return {
    'usage': np.mean(counts > 0, axis=1).tolist(),
    'entropy_bits': entropy.tolist(),
    'perplexity': np.exp2(entropy).tolist(),
  }

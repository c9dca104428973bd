"""Validation of what users hand the codec, shared by every entry point.

`Codec`, the streaming wrappers and the token helpers all accept numpy or
JAX arrays from callers; each check turns anything the model cannot treat
correctly into a ValueError with a one-line reason, instead of garbage out.
"""

import numpy as np

from spectrostream_jax.models import quantizer as rvq


def as_array(x, what: str) -> np.ndarray:
  try:
    return np.asarray(x)
  except Exception as e:
    raise ValueError(f'{what} is not an array: {e}') from e


def check_finite(x: np.ndarray, what: str) -> None:
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{what} contains NaN or Inf')


def check_audio(wav, allow_empty: bool = False) -> np.ndarray:
  """float32 [B, T, 1 or 2], finite; ValueError with the reason otherwise."""
  wav = as_array(wav, 'wav')
  if wav.ndim != 3:
    raise ValueError(f'wav must be [batch, samples, channels], got {wav.shape}')
  if wav.dtype != np.float32:
    raise ValueError(f'wav must be float32, got {wav.dtype}')
  if wav.shape[-1] not in (1, 2):
    raise ValueError(f'wav must have 1 or 2 channels, got {wav.shape[-1]}')
  if not allow_empty and (wav.shape[0] == 0 or wav.shape[1] == 0):
    raise ValueError(f'wav is empty: shape {wav.shape}')
  check_finite(wav, 'wav')
  return wav


def check_levels(levels, num_levels: int) -> int:
  if not isinstance(levels, (int, np.integer)) or not (
    1 <= levels <= num_levels
  ):
    raise ValueError(f'num_levels must be an int in 1..{num_levels}')
  return int(levels)


def check_codes(
  codes, quantizer: rvq.QuantizerConfig, allow_empty: bool = False
) -> np.ndarray:
  """int [B, N, levels] codes in range, as int32; ValueError otherwise."""
  codes = as_array(codes, 'codes')
  if codes.ndim != 3:
    raise ValueError(
      f'codes must be [batch, frames, levels], got {codes.shape}'
    )
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f'codes must be integers, got {codes.dtype}')
  if 0 in codes.shape and not (allow_empty and codes.shape[2]):
    raise ValueError(f'codes are empty: shape {codes.shape}')
  check_levels(codes.shape[-1], quantizer.num_levels)
  k = quantizer.codebook_size
  if codes.size and (codes.min() < 0 or codes.max() >= k):
    raise ValueError(
      f'codes must lie in [0, {k}), got [{codes.min()}, {codes.max()}]'
    )
  return codes.astype(np.int32)


def check_embeddings(
  emb, dim: int, batch_size: int | None = None, allow_empty: bool = False
) -> np.ndarray:
  """float32 [B, N, dim] (B = batch_size when given), finite."""
  emb = as_array(emb, 'embeddings')
  b = 'B' if batch_size is None else batch_size
  if (
    emb.ndim != 3
    or emb.shape[-1] != dim
    or emb.dtype != np.float32
    or (batch_size is not None and emb.shape[0] != batch_size)
  ):
    raise ValueError(
      f'embeddings must be float32 [{b}, N, {dim}], got {emb.dtype} {emb.shape}'
    )
  if not allow_empty and 0 in emb.shape:
    raise ValueError(f'embeddings are empty: shape {emb.shape}')
  check_finite(emb, 'embeddings')
  return emb

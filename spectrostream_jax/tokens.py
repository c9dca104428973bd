"""RVQ codes as token sequences for language models over audio.

Codes [B, N, L] (N frames, L levels, each code in [0, K)) become

* token ids: `code + K·level`, one vocabulary of K·L ids in which level l
  owns [K·l, K·(l+1)), so an id says which codebook it came from;
* a level pattern: 'interleave' flattens frame-major to [B, N·L]
  (f0l0 f0l1 … f1l0 …); 'delay' (MusicGen) shifts level l by l steps to
  [B, N + L - 1, L], so one step predicts all levels of different frames,
  with `pad_token` in the cells no frame fills.

    codes, mask = encode_batch(codec, clips, num_levels=8)
    k = codec.config.quantizer.codebook_size
    pad = vocab_size(k, 8)  # the first id after the vocabulary
    seq = apply_pattern(to_token_ids(codes, k), 'delay', pad_token=pad)
    weight = pattern_mask(mask, 'delay', 8)  # False on padding

Arrays in may be numpy or JAX; arrays out are numpy. Malformed input is a
one-line ValueError, never a silently wrong sequence.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from spectrostream_jax import inference

PATTERNS = ('interleave', 'delay')


def vocab_size(codebook_size: int, num_levels: int) -> int:
  """Token ids of `to_token_ids` lie in [0, vocab_size); free ids follow."""
  return codebook_size * num_levels


def to_token_ids(codes, codebook_size: int) -> np.ndarray:
  """int codes [..., L] in [0, K) -> int32 ids `code + K·level`."""
  codes = _levels_last(codes, 'codes')
  _check_codebook_size(codebook_size)
  if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
    raise ValueError(
      f'codes must lie in [0, {codebook_size}), got '
      f'[{codes.min()}, {codes.max()}]'
    )
  offsets = codebook_size * np.arange(codes.shape[-1], dtype=np.int64)
  return _int32(codes + offsets)


def from_token_ids(ids, codebook_size: int) -> np.ndarray:
  """Inverse of `to_token_ids`: ids [..., L] -> int32 codes [..., L].

  Each id must belong to the level of its position.
  """
  ids = _levels_last(ids, 'token ids')
  _check_codebook_size(codebook_size)
  levels = np.arange(ids.shape[-1], dtype=np.int64)
  codes = ids - codebook_size * levels
  wrong = (codes < 0) | (codes >= codebook_size)
  if wrong.any():
    index = tuple(int(i) for i in np.argwhere(wrong)[0])
    raise ValueError(
      f'token id {ids[index]} at {index} is not of level {index[-1]} '
      f'(ids [{codebook_size * index[-1]}, {codebook_size * (index[-1] + 1)}))'
    )
  return codes.astype(np.int32)


def interleave(codes) -> np.ndarray:
  """[B, N, L] -> [B, N·L], frame-major: f0l0 f0l1 … f0l(L-1) f1l0 …."""
  codes = _frames(codes, 'codes')
  b, n, levels = codes.shape
  return _int32(codes.reshape(b, n * levels))


def deinterleave(seq, num_levels: int) -> np.ndarray:
  """Inverse of `interleave`: [B, N·L] -> [B, N, L]."""
  seq = _integers(seq, 'sequence')
  if seq.ndim != 2:
    raise ValueError(f'sequence must be [batch, steps], got {seq.shape}')
  _check_levels(num_levels)
  b, steps = seq.shape
  if steps % num_levels:
    raise ValueError(
      f'sequence length {steps} is not a multiple of {num_levels} levels'
    )
  return _int32(seq.reshape(b, steps // num_levels, num_levels))


def delay(codes, pad_token: int) -> np.ndarray:
  """[B, N, L] -> [B, N + L - 1, L]: out[:, t + l, l] = codes[:, t, l].

  The other cells (level l's first l steps and last L - 1 - l) hold
  `pad_token`, which must not occur in `codes`.
  """
  codes = _frames(codes, 'codes')
  _check_pad(pad_token)
  if np.any(codes == pad_token):
    raise ValueError(f'pad_token {pad_token} occurs in the codes')
  b, n, levels = codes.shape
  out = np.full((b, n + levels - 1, levels), pad_token, codes.dtype)
  for level in range(levels):
    out[:, level : level + n, level] = codes[:, :, level]
  return _int32(out)


def undelay(seq, pad_token: int) -> np.ndarray:
  """Inverse of `delay`: [B, N + L - 1, L] -> [B, N, L].

  The cells `delay` pads must hold `pad_token`; anything else there means
  the sequence was not delayed (or was generated out of pattern).
  """
  seq = _frames(seq, 'delayed sequence')
  _check_pad(pad_token)
  b, steps, levels = seq.shape
  n = steps - levels + 1
  if n < 1:
    raise ValueError(
      f'a delayed sequence of {levels} levels has >= {levels} steps, '
      f'got {steps}'
    )
  out = np.empty((b, n, levels), seq.dtype)
  pads = np.ones((steps, levels), bool)
  for level in range(levels):
    out[:, :, level] = seq[:, level : level + n, level]
    pads[level : level + n, level] = False
  if np.any(seq[:, pads] != pad_token):
    raise ValueError(f'padding cells of the delay pattern are not {pad_token}')
  return _int32(out)


def apply_pattern(
  codes, pattern: str, pad_token: int | None = None
) -> np.ndarray:
  """`interleave(codes)` or `delay(codes, pad_token)` by name."""
  if pattern == 'interleave':
    return interleave(codes)
  if pattern == 'delay':
    if pad_token is None:
      raise ValueError("the 'delay' pattern needs a pad_token")
    return delay(codes, pad_token)
  raise ValueError(f'unknown pattern {pattern!r}; choose from {PATTERNS}')


def revert_pattern(
  seq, pattern: str, num_levels: int, pad_token: int | None = None
) -> np.ndarray:
  """Inverse of `apply_pattern`: back to codes [B, N, num_levels]."""
  if pattern == 'interleave':
    return deinterleave(seq, num_levels)
  if pattern == 'delay':
    if pad_token is None:
      raise ValueError("the 'delay' pattern needs a pad_token")
    out = undelay(seq, pad_token)
    if out.shape[-1] != num_levels:
      raise ValueError(
        f'delayed sequence has {out.shape[-1]} levels, expected {num_levels}'
      )
    return out
  raise ValueError(f'unknown pattern {pattern!r}; choose from {PATTERNS}')


def pattern_mask(mask, pattern: str, num_levels: int) -> np.ndarray:
  """Frame mask [B, N] -> where `apply_pattern`'s output holds valid frames.

  [B, N·L] for 'interleave', [B, N + L - 1, L] for 'delay' (pad cells are
  False), so a loss can skip the padding `encode_batch` adds.
  """
  mask = np.asarray(mask)
  if mask.dtype != bool or mask.ndim != 2 or 0 in mask.shape:
    raise ValueError(
      f'mask must be non-empty bool [batch, frames], got {mask.dtype} '
      f'{mask.shape}'
    )
  _check_levels(num_levels)
  if pattern == 'interleave':
    return np.repeat(mask, num_levels, axis=1)
  if pattern == 'delay':
    b, n = mask.shape
    out = np.zeros((b, n + num_levels - 1, num_levels), bool)
    for level in range(num_levels):
      out[:, level : level + n, level] = mask
    return out
  raise ValueError(f'unknown pattern {pattern!r}; choose from {PATTERNS}')


def encode_batch(
  codec: 'inference.Codec',
  clips: Sequence,
  num_levels: int | None = None,
  num_frames: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Variable-length clips float32 [T_i, C] -> (codes, mask).

  codes: int32 [B, N_max, L], zero past each clip's end; mask: bool
  [B, N_max], True on the codec.config.num_embeddings(T_i) frames of clip
  i. Clips are zero-padded to whole frames and encoded in one batch, so
  clip i's codes are `codec.encode` of it padded to a multiple of
  samples_per_frame (what a stream gives; unpadded, the last frame of a
  ragged clip may differ). `num_frames` fixes N_max (one compile for
  every batch); a longer clip is a ValueError. Mono clips in a stereo
  batch are duplicated, as `codec.encode` does.
  """
  if isinstance(clips, np.ndarray) or not isinstance(clips, Sequence):
    raise ValueError('clips must be a list of [samples, channels] arrays')
  if not clips:
    raise ValueError('clips is empty')
  arrays = []
  for i, clip in enumerate(clips):
    clip = np.asarray(clip)
    if clip.ndim != 2 or clip.shape[-1] not in (1, 2):
      raise ValueError(
        f'clip {i} must be [samples, 1 or 2 channels], got {clip.shape}'
      )
    if clip.dtype != np.float32:
      raise ValueError(f'clip {i} must be float32, got {clip.dtype}')
    if clip.shape[0] == 0:
      raise ValueError(f'clip {i} is empty')
    arrays.append(clip)
  c = codec.config
  frames = [c.num_embeddings(len(clip)) for clip in arrays]
  if num_frames is None:
    num_frames = max(frames)
  elif not isinstance(num_frames, int) or num_frames < max(frames):
    raise ValueError(
      f'num_frames must be an int >= the longest clip ({max(frames)} frames)'
      f', got {num_frames!r}'
    )
  channels = max(clip.shape[-1] for clip in arrays)
  wav = np.zeros(
    (len(arrays), num_frames * c.samples_per_frame, channels), np.float32
  )
  for i, clip in enumerate(arrays):
    wav[i, : len(clip)] = clip
  codes = codec.encode(wav, num_levels)
  mask = np.arange(num_frames) < np.asarray(frames)[:, None]
  return np.where(mask[..., None], codes, 0).astype(np.int32), mask


# Validation ------------------------------------------------------------------


def _integers(x, what: str) -> np.ndarray:
  try:
    x = np.asarray(x)
  except Exception as e:
    raise ValueError(f'{what} is not an array: {e}') from e
  if not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f'{what} must be integers, got {x.dtype}')
  return x.astype(np.int64)


def _levels_last(x, what: str) -> np.ndarray:
  x = _integers(x, what)
  if x.ndim < 1 or x.shape[-1] == 0:
    raise ValueError(f'{what} has no level axis: shape {x.shape}')
  return x


def _frames(x, what: str) -> np.ndarray:
  x = _integers(x, what)
  if x.ndim != 3 or 0 in x.shape:
    raise ValueError(
      f'{what} must be non-empty [batch, frames, levels], got {x.shape}'
    )
  return x


def _check_codebook_size(k) -> None:
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'codebook_size must be a positive int, got {k!r}')


def _check_levels(levels) -> None:
  if not isinstance(levels, (int, np.integer)) or levels < 1:
    raise ValueError(f'num_levels must be a positive int, got {levels!r}')


def _check_pad(pad_token) -> None:
  if not isinstance(pad_token, (int, np.integer)):
    raise ValueError(f'pad_token must be an int, got {pad_token!r}')


def _int32(x: np.ndarray) -> np.ndarray:
  if x.size and (x.min() < -(2**31) or x.max() >= 2**31):
    raise ValueError('token ids do not fit in int32')
  return x.astype(np.int32)

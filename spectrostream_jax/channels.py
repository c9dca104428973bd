"""One conversion from a file's channels to the codec's, for every path.

The CLI, training crops, dataset builds and the evaluation clips all use
`to_channels`, so a 5.1 file becomes the same stereo whether it is
encoded, trained on or measured. numpy only: it runs in grain's worker
processes and in the CLI without soxr or JAX.
"""

import math

import numpy as np

# What to do with more than two channels: 'downmix' mixes them with the
# matrix for the WAVE channel order; 'first_two' keeps channels 0 and 1.
CHANNEL_MODES = ('downmix', 'first_two')

# Downmix matrices [C, 2] for the WAVE default channel orders:
# 3 L R C; 4 L R Ls Rs; 5 L R C Ls Rs; 6 L R C LFE Ls Rs;
# 7 L R C LFE Cs Ls Rs; 8 L R C LFE Lb Rb Ls Rs. LFE is dropped.
_H = 1 / math.sqrt(2)
_DOWNMIX = {
  3: [[1, 0], [0, 1], [_H, _H]],
  4: [[1, 0], [0, 1], [_H, 0], [0, _H]],
  5: [[1, 0], [0, 1], [_H, _H], [_H, 0], [0, _H]],
  6: [[1, 0], [0, 1], [_H, _H], [0, 0], [_H, 0], [0, _H]],
  7: [[1, 0], [0, 1], [_H, _H], [0, 0], [0.5, 0.5], [_H, 0], [0, _H]],
  8: [[1, 0], [0, 1], [_H, _H], [0, 0], [_H, 0], [0, _H], [_H, 0], [0, _H]],
}


def to_channels(
  x: np.ndarray, num_channels: int, mode: str = 'downmix'
) -> np.ndarray:
  """[N, C] -> [N, num_channels]: mono duplicated, stereo kept, more mixed.

  More than two channels are made stereo by `mode`. The 'downmix' weights
  of each side sum to one, so the mix is never louder than its loudest
  input; beyond eight channels even ones go left and odd ones right. A
  mono model gets the mean of the stereo.
  """
  if num_channels not in (1, 2):
    raise ValueError(f'num_channels must be 1 or 2, got {num_channels}')
  if mode not in CHANNEL_MODES:
    raise ValueError(f'channel mode {mode!r} not in {CHANNEL_MODES}')
  c = x.shape[1]
  if c == num_channels:
    return x
  if c == 1:
    stereo = np.concatenate([x, x], axis=1)
  elif c == 2:
    stereo = x
  elif mode == 'first_two':
    stereo = x[:, :2]
  else:
    matrix = np.asarray(
      _DOWNMIX.get(c) or [[1 - i % 2, i % 2] for i in range(c)]
    )
    stereo = x @ (matrix / matrix.sum(axis=0)).astype(x.dtype)
  if num_channels == 1:
    return np.mean(stereo, axis=1, keepdims=True)
  return stereo

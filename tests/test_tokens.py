"""Token ids, level patterns and batched encoding for language models."""

import numpy as np
import pytest

from spectrostream_jax import Codec
from spectrostream_jax import tokens
from spectrostream_jax.models import codec as codec_lib

K = 64


def random_codes(b=2, n=5, levels=8, seed=0):
  return np.random.default_rng(seed).integers(0, K, (b, n, levels), np.int32)


def test_token_ids_round_trip():
  codes = random_codes()
  ids = tokens.to_token_ids(codes, K)
  assert ids.dtype == np.int32 and ids.shape == codes.shape
  levels = np.arange(8)
  assert np.all(ids // K == levels) and np.all(ids % K == codes)
  assert ids.max() < tokens.vocab_size(K, 8)
  np.testing.assert_array_equal(tokens.from_token_ids(ids, K), codes)


def test_token_id_of_the_wrong_level():
  ids = tokens.to_token_ids(random_codes(), K)
  ids[1, 2, 3] = 5  # A level-0 id at level 3.
  with pytest.raises(ValueError, match=r'token id 5 at \(1, 2, 3\)'):
    tokens.from_token_ids(ids, K)


def test_interleave_is_frame_major():
  codes = np.array([[[1, 2, 3], [4, 5, 6]]])
  np.testing.assert_array_equal(tokens.interleave(codes), [[1, 2, 3, 4, 5, 6]])
  codes = random_codes()
  seq = tokens.interleave(codes)
  assert seq.shape == (2, 40)
  np.testing.assert_array_equal(tokens.deinterleave(seq, 8), codes)


def test_delay_shifts_level_l_by_l():
  codes = np.array([[[1, 2, 3], [4, 5, 6]]])
  p = -1
  want = [[[1, p, p], [4, 2, p], [p, 5, 3], [p, p, 6]]]
  np.testing.assert_array_equal(tokens.delay(codes, p), want)
  np.testing.assert_array_equal(tokens.undelay(want, p), codes)


@pytest.mark.parametrize('pattern', tokens.PATTERNS)
@pytest.mark.parametrize('n,levels', [(1, 1), (1, 8), (7, 3), (20, 8)])
def test_patterns_round_trip(pattern, n, levels):
  ids = tokens.to_token_ids(random_codes(n=n, levels=levels), K)
  pad = tokens.vocab_size(K, levels)
  seq = tokens.apply_pattern(ids, pattern, pad_token=pad)
  if pattern == 'delay':
    assert seq.shape == (2, n + levels - 1, levels)
    # Frame 0's level l is at step l.
    for level in range(levels):
      np.testing.assert_array_equal(seq[:, level, level], ids[:, 0, level])
  else:
    assert seq.shape == (2, n * levels)
  back = tokens.revert_pattern(seq, pattern, levels, pad_token=pad)
  np.testing.assert_array_equal(back, ids)


@pytest.mark.parametrize('pattern', tokens.PATTERNS)
def test_pattern_mask_follows_the_frames(pattern):
  codes = random_codes(n=6, levels=4)
  mask = np.array([[True] * 6, [True] * 2 + [False] * 4])
  # Mark invalid frames with -2 and see where the pattern puts them.
  marked = np.where(mask[..., None], codes, -2)
  seq = tokens.apply_pattern(marked, pattern, pad_token=-1)
  want = seq >= 0
  np.testing.assert_array_equal(tokens.pattern_mask(mask, pattern, 4), want)


@pytest.mark.parametrize(
  'call,match',
  [
    (lambda: tokens.to_token_ids(np.full((1, 2, 3), K), K), r'\[0, 64\)'),
    (lambda: tokens.to_token_ids(np.zeros((2, 3)), K), 'integers'),
    (lambda: tokens.to_token_ids(np.zeros((2, 0), int), K), 'level axis'),
    (lambda: tokens.to_token_ids(np.zeros((2, 3), int), 0), 'codebook_size'),
    (lambda: tokens.interleave(np.zeros((2, 3), int)), 'batch, frames'),
    (lambda: tokens.interleave(np.zeros((2, 0, 3), int)), 'non-empty'),
    (lambda: tokens.deinterleave(np.zeros((2, 7), int), 3), 'multiple of 3'),
    (lambda: tokens.deinterleave(np.zeros((2, 6), int), 0), 'num_levels'),
    (lambda: tokens.deinterleave(np.zeros((1, 2, 6), int), 3), 'batch, steps'),
    (lambda: tokens.delay(random_codes(), 7), 'pad_token 7 occurs'),
    (lambda: tokens.delay(random_codes(), 1.5), 'pad_token must be an int'),
    (lambda: tokens.undelay(np.zeros((1, 2, 3), int), -1), '>= 3 steps'),
    (
      lambda: tokens.undelay(tokens.delay(random_codes(), -1) + 1, -1),
      'padding cells',
    ),
    (lambda: tokens.apply_pattern(random_codes(), 'spiral'), 'unknown'),
    (lambda: tokens.pattern_mask(np.ones((2, 3)), 'delay', 2), 'bool'),
    (lambda: tokens.pattern_mask(np.ones((2, 3), bool), 'x', 2), 'unknown'),
    (lambda: tokens.apply_pattern(random_codes(), 'delay'), 'needs a pad'),
    (
      lambda: tokens.revert_pattern(
        tokens.delay(random_codes(), -1), 'delay', 4, pad_token=-1
      ),
      'expected 4',
    ),
  ],
)
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# encode_batch ----------------------------------------------------------------


@pytest.fixture(scope='module')
def codec():
  return Codec.random(codec_lib.tiny(), seed=0)


def clips(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.uniform(-0.5, 0.5, (t, 2)).astype(np.float32) for t in lengths]


def test_encode_batch_masks_and_codes(codec):
  batch = clips([3 * 1920, 5000, 1920 * 4 + 7, 100])
  batch[1] = batch[1][:, :1]  # Mono among stereo: duplicated.
  codes, mask = tokens.encode_batch(codec, batch, num_levels=4)
  assert codes.shape == (4, 5, 4) and codes.dtype == np.int32
  frames = [codec.config.num_embeddings(len(c)) for c in batch]
  np.testing.assert_array_equal(mask.sum(axis=1), frames)
  assert mask.dtype == bool and np.all(mask[:, 0])
  for clip, row, n in zip(batch, codes, frames, strict=True):
    # Each clip's codes: the clip padded to whole frames, encoded alone.
    padded = np.zeros((n * 1920, clip.shape[1]), np.float32)
    padded[: len(clip)] = clip
    np.testing.assert_array_equal(row[:n], codec.encode(padded[None], 4)[0])
    assert np.all(row[n:] == 0)
  fixed, fixed_mask = tokens.encode_batch(codec, batch, 4, num_frames=7)
  assert fixed.shape == (4, 7, 4)
  np.testing.assert_array_equal(fixed[:, :5], codes)
  assert not fixed_mask[:, 5:].any()


@pytest.mark.parametrize(
  'batch,kwargs,match',
  [
    ([], {}, 'empty'),
    (np.zeros((2, 1920, 2), np.float32), {}, 'list'),
    ([np.zeros(1920, np.float32)], {}, r'clip 0 must be \[samples'),
    ([np.zeros((1920, 3), np.float32)], {}, '1 or 2 channels'),
    ([np.zeros((1920, 2))], {}, 'float32'),
    ([np.zeros((0, 2), np.float32)], {}, 'clip 0 is empty'),
    ([np.zeros((1921, 2), np.float32)], {'num_frames': 1}, 'longest clip'),
    ([np.zeros((1920, 2), np.float32)], {'num_levels': 9}, 'num_levels'),
  ],
)
def test_encode_batch_bad_input(codec, batch, kwargs, match):
  with pytest.raises(ValueError, match=match):
    tokens.encode_batch(codec, batch, **kwargs)

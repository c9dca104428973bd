"""Per-layer streaming contracts (tests/streaming_contracts.py).

Each streaming layer, stepped over chunkings with a ragged last chunk, one
and several blocks per step and a batch of 2, equals its whole-sequence
call: the convs, the residual units, and the whole Encoder and Decoder of
the production, mono and ablation configs (docs/streaming.md).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from streaming_contracts import assert_streams_like_whole
from streaming_contracts import cut
from streaming_contracts import default_chunkings

from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import layers


def _normal(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _id(value):
  """`(4, 3)` -> '4x3' in test ids."""
  return 'x'.join(map(str, value)) if isinstance(value, tuple) else None


# (kernel, strides). Kernel (1, 1) at time stride 2 is shorter than its
# stride (no codec layer is, see `resample_kernel`); it once gave the whole
# call an extra window of end padding alone (`time_padding`).
CONVS = [
  ((3, 3), (1, 1)),
  ((7, 7), (1, 1)),
  ((3, 3), (1, 2)),
  ((4, 4), (2, 2)),
  ((4, 3), (2, 1)),
  ((6, 3), (3, 1)),
  ((3, 3), (2, 1)),
  ((2, 1), (2, 1)),
  ((1, 1), (2, 1)),
]


@pytest.mark.parametrize(('kernel', 'strides'), CONVS, ids=_id)
def test_causal_conv(kernel, strides):
  x = _normal(2, 11, 12, 3)  # 11 frames: ragged for time strides 2 and 3.
  assert_streams_like_whole(
    lambda s: layers.CausalConv2D(5, kernel, strides, streaming=s),
    x,
    block=strides[0],
    expect_state=kernel[0] > strides[0],  # History: kernel - stride frames.
    optimize=False,
  )


@pytest.mark.parametrize(
  ('kernel', 'strides'),
  [((4, 3), (2, 1)), ((4, 4), (2, 2)), ((3, 4), (1, 2)), ((6, 3), (3, 1))],
  ids=_id,
)
def test_causal_conv_transpose(kernel, strides):
  assert_streams_like_whole(
    lambda s: layers.CausalConvTranspose2D(5, kernel, strides, streaming=s),
    _normal(2, 7, 6, 3),
    optimize=False,
  )


@pytest.mark.parametrize('transposed', [False, True], ids=['conv', 'transpose'])
def test_output_slices(monkeypatch, transposed):
  """A kernel cut into output-channel slices (as the production decoder's
  biggest are, `layers.OUTPUT_SLICING`) streams like the whole call."""
  monkeypatch.setattr(layers, 'OUTPUT_SLICING', ((0, 2),))
  if transposed:  # Time phases fused: 2 · 6 output channels, 6 slices.
    x = _normal(2, 7, 6, 3)

    def make(s):
      return layers.CausalConvTranspose2D(6, (4, 3), (2, 1), streaming=s)
  else:
    x = _normal(2, 9, 12, 3)

    def make(s):
      return layers.CausalConv2D(6, (3, 3), streaming=s)

  prepared = make(True).init(jax.random.key(0), x[:, :2])['prepared']
  shapes = [a.shape for a in jax.tree.leaves(prepared)]
  want = [(2, 3, 3, 2)] * 6 if transposed else [(3, 3, 3, 2)] * 3
  assert shapes == want
  assert_streams_like_whole(make, x, optimize=False)


# (strides, in, out): every stride of the codec, projected shortcut or not.
UNITS = [((1, 1), 4, 4), ((1, 2), 4, 8), ((1, 3), 4, 4), ((2, 2), 8, 8)]
UNITS += [((2, 1), 8, 16)]


@pytest.mark.parametrize(('strides', 'cin', 'cout'), UNITS, ids=_id)
def test_encoder_unit(strides, cin, cout):
  assert_streams_like_whole(
    lambda s: layers.EncoderUnit(cout, strides, streaming=s),
    _normal(2, 9, 12, cin),
    block=strides[0],
    chunkings=default_chunkings(9, strides[0], num_random=1, max_blocks=2),
    optimize=False,
  )


@pytest.mark.parametrize(('strides', 'cin', 'cout'), UNITS, ids=_id)
def test_decoder_unit(strides, cin, cout):
  assert_streams_like_whole(
    lambda s: layers.DecoderUnit(cout, strides, streaming=s),
    _normal(2, 5, 6, cin),
    chunkings=default_chunkings(5, num_random=1, max_blocks=2),
    optimize=False,
  )


R = dataclasses.replace
# The Encoder depends on fusion_block, the Decoder on split_block and
# lookahead; production fuses at 6, splits at 0, looks 1 frame ahead.
# Encoder: (config, STFT frames), each last chunk ragged a different way.
ENCODERS = {
  'production': (codec_lib.production, 9),
  'mono': (codec_lib.mono, 11),
  'tiny_fusion0': (lambda: R(codec_lib.tiny(), fusion_block=0), 10),
  'tiny_fusion8': (lambda: R(codec_lib.tiny(), fusion_block=8), 12),
}
DECODERS = {
  'production': codec_lib.production,
  'mono': codec_lib.mono,
  'tiny_split-1_lookahead0': lambda: R(
    codec_lib.tiny(), split_block=-1, lookahead=0
  ),
  'tiny_split3_lookahead2': lambda: R(
    codec_lib.tiny(), split_block=3, lookahead=2
  ),
  'tiny_split6': lambda: R(codec_lib.tiny(), split_block=6),
}
# Compiling dominates these short runs: all but production (compiled as
# streaming.py compiles it) skip XLA's optimisations, about 3× quicker.
OPTIMIZE = {'production'}  # The layer tests above skip them too.


def _model_chunkings(length, block):
  """1 and 2 blocks per step, and 2 then 1s: two step compiles (+ tail)."""
  ones, twos = [block] * length, [2 * block] * length
  found = [cut(length, ones), cut(length, twos), cut(length, twos[:1] + ones)]
  return list(dict.fromkeys(found))


@pytest.mark.parametrize('name', ENCODERS)
def test_encoder(name):
  """Chunks of 1 and 2 embeddings (4 STFT frames each), ragged last."""
  make_config, frames = ENCODERS[name]
  config = make_config()
  x = _normal(2, frames, config.frame_length // 2, 2 * config.num_channels)
  assert_streams_like_whole(
    lambda s: codec_lib.Encoder(config, streaming=s),
    x,
    block=config.time_stride,
    chunkings=_model_chunkings(frames, config.time_stride),
    optimize=name in OPTIMIZE,
  )


@pytest.mark.parametrize('name', DECODERS)
def test_decoder(name):
  """Chunks of 1 and 2 embeddings; the stream's look-ahead is dropped."""
  config = DECODERS[name]()
  n = config.lookahead + 3
  assert_streams_like_whole(
    lambda s: codec_lib.Decoder(config, streaming=s),
    _normal(2, n, config.embedding_dim),
    chunkings=_model_chunkings(n, 1),
    output_latency=config.lookahead * config.time_stride,
    optimize=name in OPTIMIZE,
  )


# The contract must fail when the history is lost; these stand-ins for
# `layers._with_history` are the two ways to lose it.
def _history_never_stored(module, x, frames):
  if frames == 0:
    return x
  b, _, f, c = x.shape
  history = module.variable(
    'stream', 'history', jnp.zeros, (b, frames, f, c), x.dtype
  )
  return jnp.concatenate([history.value, x], axis=1)


def _history_of_wrong_frames(module, x, frames):
  if frames == 0:
    return x
  b, _, f, c = x.shape
  history = module.variable(
    'stream', 'history', jnp.zeros, (b, frames, f, c), x.dtype
  )
  x = jnp.concatenate([history.value, x], axis=1)
  history.value = x[:, :frames]  # The oldest frames, not the newest.
  return x


BROKEN_LAYERS = {  # name: (streaming -> layer, block)
  'conv': (lambda s: layers.CausalConv2D(4, (4, 3), (2, 1), streaming=s), 2),
  'transpose': (
    lambda s: layers.CausalConvTranspose2D(4, (4, 3), (2, 1), streaming=s),
    1,
  ),
  'decoder_unit': (lambda s: layers.DecoderUnit(4, (2, 2), streaming=s), 1),
}


@pytest.mark.parametrize(
  'broken',
  [_history_never_stored, _history_of_wrong_frames],
  ids=['never_stored', 'wrong_frames'],
)
@pytest.mark.parametrize('layer', BROKEN_LAYERS)
def test_lost_history_breaks_the_contract(monkeypatch, broken, layer):
  make, block = BROKEN_LAYERS[layer]
  monkeypatch.setattr(layers, '_with_history', broken)
  with pytest.raises(AssertionError, match='Not equal to tolerance'):
    assert_streams_like_whole(
      make, _normal(2, 8, 6, 3), block=block, optimize=False
    )


class _IgnoresItsState(nn.Module):
  """Keeps a history it never reads: the contract alone would pass."""

  streaming: bool = False

  @nn.compact
  def __call__(self, x):
    if self.streaming:
      self.variable('stream', 'history', jnp.zeros, x[:, :1].shape)
    return 2.0 * x


def test_unused_state_is_caught():
  with pytest.raises(AssertionError, match='zero state every step'):
    assert_streams_like_whole(_IgnoresItsState, _normal(2, 5, 3))


def test_chunkings_cover_the_contract():
  cuts = default_chunkings(10, block=4, num_random=2, max_blocks=2)
  assert cuts[:2] == [(4, 4, 2), (8, 2)]
  assert cuts[-1] == (10,)
  for chunking in cuts:
    assert sum(chunking) == 10
    assert all(c % 4 == 0 for c in chunking[:-1])


def test_ragged_chunk_mid_stream_is_rejected():
  conv = lambda s: layers.CausalConv2D(2, (4, 3), (2, 1), streaming=s)
  with pytest.raises(ValueError, match='only the last chunk'):
    assert_streams_like_whole(
      conv, _normal(2, 6, 4, 1), block=2, chunkings=[(3, 3)]
    )
  with pytest.raises(ValueError, match='different elements'):
    assert_streams_like_whole(conv, np.zeros((2, 6, 4, 1)), block=2)

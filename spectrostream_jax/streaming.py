"""Frame-by-frame encoding and decoding with explicit state (docs/streaming.md).

A stream is cut into chunks of whole code frames (1920 samples, 40 ms).
Every causal conv keeps the input frames its next chunk needs, the iSTFT
keeps its overlap-add tail, and the STFT needs 480 samples past a frame's
end; all of it lives in a state pytree that the jitted step takes and
returns (and donates). A zero state is the whole-sequence zero padding, so
the streamed codes and audio equal the whole-sequence ones for any chunking
of the input, the ragged last frame included (the flush runs it through the
same end padding as the whole-sequence path).

Functional core: `prepare_weights`, `init_encoder_state`, `encode_step`,
`init_decoder_state`, `decode_step`. Imperative wrappers that buffer
samples on the host and keep the state on the device: `StreamingEncoder`,
`StreamingDecoder`. The steps multiply at their `precision` mode, full
float32 by default (docs/precision.md); the wrappers take their codec's.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import checks
from spectrostream_jax import precision as precision_lib
from spectrostream_jax import signal
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import quantizer as rvq

State = dict[str, Any]


def _encoder_net(config, params, prepared, state, features):
  emb, variables = codec_lib.Encoder(config, streaming=True).apply(
    {'params': params, 'prepared': prepared, 'stream': state},
    features,
    mutable=['stream'],
  )
  return emb, variables['stream']


def _decoder_net(config, params, prepared, state, emb):
  feats, variables = codec_lib.Decoder(config, streaming=True).apply(
    {'params': params, 'prepared': prepared, 'stream': state},
    emb,
    mutable=['stream'],
  )
  return feats, variables['stream']


@functools.partial(jax.jit, static_argnums=0)
def _prepared_tensors(config: codec_lib.CodecConfig, params: dict) -> dict:
  emb = jnp.zeros((1, 1, config.embedding_dim))
  _, dec = codec_lib.Decoder(config, streaming=True).apply(
    {'params': params['decoder']}, emb, mutable=['stream', 'prepared']
  )
  _, enc = codec_lib.Encoder(config, streaming=True).apply(
    {'params': params['encoder']},
    jnp.zeros(_features_shape(config, 1)),
    mutable=['stream', 'prepared'],
  )
  return {
    'encoder': enc.get('prepared', {}),
    'decoder': dec.get('prepared', {}),
    'code_norms': rvq.code_norms(params['quantizer']['embedding']),
  }


def _features_shape(config: codec_lib.CodecConfig, batch_size: int):
  """STFT features of one code frame: [B, frames, bins, 2·channels]."""
  return (
    batch_size,
    config.time_stride,
    config.frame_length // 2,
    2 * config.num_channels,
  )


def prepare_weights(config: codec_lib.CodecConfig, params: dict) -> dict:
  """Params plus the layouts a step would otherwise recompute every call.

  Step mode cannot amortise per-call weight transforms: the transposed
  convs' phase kernels, the output slices of the biggest conv kernels,
  the codebook norms and the codebook search kernels are computed here
  once.
  """
  prepared = _prepared_tensors(config, params)
  return {
    'encoder': params['encoder'],
    'decoder': params['decoder'],
    'codebooks': params['quantizer']['embedding'],
    'search_kernels': _search_kernels(params['quantizer']['embedding']),
    'prepared_encoder': prepared['encoder'],
    'prepared_decoder': prepared['decoder'],
    'code_norms': tuple(prepared['code_norms']),
  }


# A level's codebook product, in this many parts (docs/streaming.md, "What
# changed"): XLA:CPU runs each part's 1×1 conv on its own core.
_SEARCH_PARTS = 2


@jax.jit
def _search_kernels(stacked: jax.Array) -> tuple[tuple[jax.Array, ...], ...]:
  """[levels, codes, D] -> per level, 1×1 conv kernels [1, 1, D, codes/n].

  A copy (64 MB in production), one buffer per part: a level sliced out
  of the stack inside a step would be copied before its product.
  """
  parts = _SEARCH_PARTS if stacked.shape[1] % _SEARCH_PARTS == 0 else 1
  return tuple(
    tuple(part.T[None, None] for part in jnp.split(level, parts))
    for level in stacked
  )


def _quantize(weights: dict, emb: jax.Array, num_levels: int) -> jax.Array:
  """`rvq.encode`'s level loop, unrolled, its products as 1×1 convs.

  The scores are those of `rvq.nearest_code` up to float rounding (the
  product's summation order), as the whole sequence's batched product
  already differs from a one-frame product.
  """
  codes = []
  for level in range(num_levels):
    products = [
      jax.lax.conv_general_dilated(
        emb[:, :, None, :],
        kernel,
        (1, 1),
        'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision='highest',
      )[:, :, 0]
      for kernel in weights['search_kernels'][level]
    ]
    scores = weights['code_norms'][level] - 2.0 * jnp.concatenate(
      products, axis=-1
    )
    code = jnp.argmin(scores, axis=-1).astype(jnp.int32)
    emb = emb - weights['codebooks'][level][code]
    codes.append(code)
  return jnp.stack(codes, axis=-1)


def _zeros_like_shapes(tree):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def init_encoder_state(
  config: codec_lib.CodecConfig, weights: dict, batch_size: int = 1
) -> State:
  """Zero conv histories of the encoder (its whole-sequence padding)."""
  features = jax.ShapeDtypeStruct(
    _features_shape(config, batch_size), jnp.float32
  )
  shapes = jax.eval_shape(
    lambda w, f: _encoder_net(
      config, w['encoder'], w['prepared_encoder'], {}, f
    )[1],
    weights,
    features,
  )
  return _zeros_like_shapes(shapes)


def init_decoder_state(
  config: codec_lib.CodecConfig, weights: dict, batch_size: int = 1
) -> State:
  """Zero conv histories, empty overlap-add tail, frame counter 0."""
  emb = jax.ShapeDtypeStruct((batch_size, 1, config.embedding_dim), jnp.float32)
  shapes = jax.eval_shape(
    lambda w, e: _decoder_net(
      config, w['decoder'], w['prepared_decoder'], {}, e
    )[1],
    weights,
    emb,
  )
  per = config.frame_length // config.hop_length
  return {
    'net': _zeros_like_shapes(shapes),
    'tail': jnp.zeros(
      (batch_size, per - 1, config.hop_length, config.num_channels)
    ),
    'frames': jnp.zeros((), jnp.int32),
  }


def window_frames(config: codec_lib.CodecConfig, window_samples: int) -> int:
  """STFT frames an encoder window of this many samples yields."""
  frames, extra = divmod(window_samples, config.hop_length)
  if extra or frames < 2:
    raise ValueError(
      f'an encoder window must be (frames + 1)·{config.hop_length} samples, '
      f'got {window_samples}'
    )
  return frames - 1


@functools.partial(jax.jit, static_argnums=(0, 4, 5), donate_argnums=2)
def encode_step(
  config: codec_lib.CodecConfig,
  weights: dict,
  state: State,
  window: jax.Array,
  num_levels: int | None,
  precision: str = precision_lib.DEFAULT,
) -> tuple[State, jax.Array, jax.Array | None]:
  """One chunk: window [B, hop·(F + 1), C] -> (state, emb, codes).

  The window starts at a code-frame boundary and holds F STFT frames plus
  the hop that the last frame overhangs. F is a multiple of 4 (one
  embedding per 4 frames) except for the last chunk of a stream, which may
  be ragged and is then padded exactly as the whole-sequence path pads it.
  `num_levels` None skips quantisation (codes None).
  """
  with precision_lib.products(precision):
    return _encode_chunk(config, weights, state, window, num_levels)


def _encode_chunk(config, weights, state, window, num_levels):
  frames = window_frames(config, window.shape[1])
  features = codec_lib.stft_features(window, config)[:, :frames]
  emb, state = _encoder_net(
    config, weights['encoder'], weights['prepared_encoder'], state, features
  )
  codes = None
  if num_levels is not None:
    codes = _quantize(weights, emb, num_levels)
  return state, emb, codes


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def decode_step(
  config: codec_lib.CodecConfig,
  weights: dict,
  state: State,
  inputs: jax.Array,
  precision: str = precision_lib.DEFAULT,
) -> tuple[State, jax.Array]:
  """One chunk: codes [B, n, levels] (or embeddings [B, n, D]) -> audio.

  Returns the next state and [B, n·1920, C] samples, aligned one block per
  input frame. The first `lookahead` blocks of a stream are the decoder's
  look-ahead and hold zeros; the wrappers drop them.
  """
  with precision_lib.products(precision):
    return _decode_chunk(config, weights, state, inputs)


def _decode_chunk(config, weights, state, inputs):
  if jnp.issubdtype(inputs.dtype, jnp.integer):
    emb = rvq.decode(weights['codebooks'], inputs)
  else:
    emb = inputs.astype(jnp.float32)
  feats, net = _decoder_net(
    config, weights['decoder'], weights['prepared_decoder'], state['net'], emb
  )
  # Frames of the look-ahead are dropped by the whole-sequence path; zero
  # them so they add nothing to the overlap-add either.
  index = state['frames'] + jnp.arange(feats.shape[1])
  dropped = index < config.lookahead * config.time_stride
  feats = jnp.where(dropped[None, :, None, None], 0.0, feats)
  parts = signal.synthesis_frames(feats, config.frame_length, config.hop_length)
  wav, tail = signal.overlap_add(parts, state['tail'])
  new_state = {
    'net': net,
    'tail': tail,
    'frames': state['frames'] + feats.shape[1],
  }
  return new_state, wav


class StreamingEncoder:
  """Audio pushed in any chunks -> codes (or embeddings) as frames complete.

  With `frames_per_step=1` (real time), code frame m is emitted once
  sample 1920·m + 2399 has been pushed: the encoder adds one frame (40 ms)
  of latency plus the STFT's 10 ms overhang. Larger steps trade latency
  for throughput (whole files). `flush()` ends the stream, ragged last
  frame included, and resets.
  """

  def __init__(
    self,
    codec,
    num_levels: int | None = None,
    *,
    quantize: bool = True,
    frames_per_step: int = 1,
    batch_size: int = 1,
  ):
    self.config, self._weights = codec.compute_config, codec.streaming_weights
    self.precision = codec.precision
    q = self.config.quantizer
    levels = checks.check_levels(
      q.num_levels if num_levels is None else num_levels, q.num_levels
    )
    if frames_per_step < 1:
      raise ValueError(f'frames_per_step must be >= 1, got {frames_per_step}')
    self.num_levels = int(levels) if quantize else None
    self.frames_per_step = frames_per_step
    self.batch_size = batch_size
    self.reset()

  @property
  def latency_frames(self) -> int:
    """Steps between pushing a frame's samples and getting its code."""
    return 1

  @property
  def latency_ms(self) -> float:
    c = self.config
    return 1000.0 * (c.samples_per_frame + c.hop_length) / c.sample_rate

  def reset(self) -> None:
    self._state = init_encoder_state(
      self.config, self._weights, self.batch_size
    )
    self._buffer = None  # Samples not yet consumed; set by the first push.
    self.frames_out = 0

  def push(self, wav) -> np.ndarray:
    """wav float32 [B, T, C] -> codes [B, k, levels] (or emb [B, k, D]).

    Frames are computed `frames_per_step` at a time, once all of them are
    complete; `flush()` computes what is left.
    """
    wav = self._check(wav)
    if self._buffer is None:
      self._buffer = wav
    else:
      self._buffer = np.concatenate([self._buffer, wav], axis=1)
    spf, hop = self.config.samples_per_frame, self.config.hop_length
    n = self.frames_per_step
    outs = []
    start = 0
    while self._buffer.shape[1] - start >= n * spf + hop:
      outs.append(self._run(self._buffer[:, start : start + n * spf + hop]))
      start += n * spf
    self._buffer = self._buffer[:, start:]
    return self._concat(outs)

  def flush(self) -> np.ndarray:
    """Emits the frames still buffered (zero-padded at the end); resets."""
    outs = []
    spf, hop = self.config.samples_per_frame, self.config.hop_length
    buffer = self._buffer if self._buffer is not None else np.zeros((0, 0, 0))
    while buffer.shape[1]:
      # The signal ends here: frames past it are zero-padded, and the last
      # chunk keeps its ragged frame count like the whole-sequence path.
      take = min(buffer.shape[1], self.frames_per_step * spf)
      frames = math.ceil(take / hop)
      window = buffer[:, : take + hop]
      pad = (frames + 1) * hop - window.shape[1]
      outs.append(self._run(np.pad(window, ((0, 0), (0, pad), (0, 0)))))
      buffer = buffer[:, take:]
    out = self._concat(outs)
    self.reset()
    return out

  def _run(self, window: np.ndarray) -> np.ndarray:
    self._state, emb, codes = encode_step(
      self.config,
      self._weights,
      self._state,
      window,
      self.num_levels,
      self.precision,
    )
    out = emb if codes is None else codes
    self.frames_out += out.shape[1]
    return out

  def _concat(self, outs: list) -> np.ndarray:
    if outs:
      return np.concatenate([np.asarray(o) for o in outs], axis=1)
    width = (
      self.config.embedding_dim if self.num_levels is None else self.num_levels
    )
    dtype = np.float32 if self.num_levels is None else np.int32
    return np.zeros((self.batch_size, 0, width), dtype)

  def _check(self, wav) -> np.ndarray:
    wav = checks.check_audio(wav, allow_empty=True)
    if wav.shape[0] != self.batch_size:
      raise ValueError(f'this stream has batch size {self.batch_size}')
    if self._buffer is not None and wav.shape[-1] != self._buffer.shape[-1]:
      raise ValueError(
        f'channel count changed mid-stream: {self._buffer.shape[-1]} -> '
        f'{wav.shape[-1]}'
      )
    return wav


class StreamingDecoder:
  """Codes (or embeddings) pushed frame by frame -> audio, 1920 per frame.

  Block m of the audio needs code frames up to m + lookahead, so the
  decoder lags `lookahead` frames (40 ms each) behind its input; the stream
  of N frames yields (N - lookahead)·1920 samples, as the whole-sequence
  decode does.
  """

  def __init__(self, codec, *, frames_per_step: int = 1, batch_size: int = 1):
    self.config, self._weights = codec.compute_config, codec.streaming_weights
    self.precision = codec.precision
    if frames_per_step < 1:
      raise ValueError(f'frames_per_step must be >= 1, got {frames_per_step}')
    self.frames_per_step = frames_per_step
    self.batch_size = batch_size
    self.reset()

  @property
  def latency_frames(self) -> int:
    return self.config.lookahead

  @property
  def latency_ms(self) -> float:
    c = self.config
    return 1000.0 * c.lookahead * c.samples_per_frame / c.sample_rate

  def reset(self) -> None:
    self._state = init_decoder_state(
      self.config, self._weights, self.batch_size
    )
    self._to_drop = self.config.lookahead * self.config.samples_per_frame
    self._pending = None  # Frames waiting for a whole step.

  def push(self, codes) -> np.ndarray:
    """codes int [B, n, levels] -> float32 audio [B, m·1920, C].

    Frames are decoded `frames_per_step` at a time; `flush()` decodes the
    rest.
    """
    return self._push(self._check_codes(codes))

  def push_embeddings(self, emb) -> np.ndarray:
    """Continuous embeddings [B, n, D], bypassing the quantiser."""
    emb = checks.check_embeddings(
      emb, self.config.embedding_dim, self.batch_size, allow_empty=True
    )
    return self._push(emb)

  def flush(self) -> np.ndarray:
    """Decodes the frames still held back; resets for a new stream."""
    out = self._run_all(self._pending) if self._pending is not None else None
    self.reset()
    return self._empty() if out is None else out

  def _push(self, inputs: np.ndarray) -> np.ndarray:
    if self._pending is not None:
      if inputs.dtype != self._pending.dtype or (
        inputs.shape[2] != self._pending.shape[2]
      ):
        raise ValueError('codes and embeddings, or level counts, mixed')
      inputs = np.concatenate([self._pending, inputs], axis=1)
    whole = inputs.shape[1] - inputs.shape[1] % self.frames_per_step
    self._pending = inputs[:, whole:] if whole < inputs.shape[1] else None
    return self._run_all(inputs[:, :whole])

  def _run_all(self, inputs: np.ndarray) -> np.ndarray:
    outs = []
    for start in range(0, inputs.shape[1], self.frames_per_step):
      chunk = inputs[:, start : start + self.frames_per_step]
      self._state, wav = decode_step(
        self.config, self._weights, self._state, chunk, self.precision
      )
      wav = np.asarray(wav)
      drop = min(self._to_drop, wav.shape[1])
      self._to_drop -= drop
      outs.append(wav[:, drop:])
    return np.concatenate(outs, axis=1) if outs else self._empty()

  def _empty(self) -> np.ndarray:
    return np.zeros((self.batch_size, 0, self.config.num_channels), np.float32)

  def _check_codes(self, codes) -> np.ndarray:
    codes = checks.check_codes(codes, self.config.quantizer, allow_empty=True)
    if codes.shape[0] != self.batch_size:
      raise ValueError(f'this stream has batch size {self.batch_size}')
    return codes

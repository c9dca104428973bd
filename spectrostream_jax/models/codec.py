"""SpectroStream encoder, decoder and codec module, with named presets.

The encoder runs each audio channel through the same weights (channels are
folded into the batch) until `fusion_block`, where the branches are
concatenated on the feature axis. The decoder runs jointly until it splits
after `split_block` into per-channel branches with shared weights. Both
choices, and the decoder look-ahead, are config values so the paper's
ablations are a config change away.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectrostream_jax import signal
from spectrostream_jax.models import layers
from spectrostream_jax.models import quantizer as rvq


@dataclasses.dataclass(frozen=True)
class CodecConfig:
  """Architecture of one SpectroStream model. Defaults: the 48 kHz preset."""

  sample_rate: int = 48_000
  num_channels: int = 2
  frame_length: int = 960
  hop_length: int = 480
  encoder_base_channels: int = 32
  # Per-branch output channels and (time, freq) strides of encoder_0..N.
  encoder_channels: tuple[int, ...] = (64, 64, 128, 128, 128, 256, 256)
  encoder_strides: tuple[tuple[int, int], ...] = (
    (1, 2),
    (1, 2),
    (1, 3),
    (1, 2),
    (1, 2),
    (2, 2),
    (2, 1),
  )
  bottleneck_channels: int = 256
  # Index in [encoder_0, ..., encoder_N, bottleneck] of the first unit that
  # sees the concatenated channels; len(encoder_channels) + 1 fuses after.
  fusion_block: int = 6
  embedding_dim: int = 256
  decoder_input_channels: int = 512
  # Per-branch output channels and strides of decoder_0..N. Units up to and
  # including `split_block` are joint and have num_channels× the channels.
  decoder_channels: tuple[int, ...] = (512, 256, 256, 256, 128, 128, 64)
  decoder_strides: tuple[tuple[int, int], ...] = (
    (2, 1),
    (2, 2),
    (1, 2),
    (1, 2),
    (1, 3),
    (1, 2),
    (1, 2),
  )
  # -1 splits right after input_layers_residual_unit.
  split_block: int = 0
  # Embeddings of look-ahead the decoder is given (frames dropped / 4).
  lookahead: int = 1
  quantizer: rvq.QuantizerConfig = rvq.QuantizerConfig()
  # Compute dtype of the convolutions ('float32' or 'bfloat16'); params f32.
  dtype: str = 'float32'

  def __post_init__(self):
    bins = self.frame_length // 2
    if bins % self.freq_stride:
      raise ValueError(
        f'{bins} bins not divisible by the frequency strides {self.freq_stride}'
      )
    if math.prod(s[0] for s in self.decoder_strides) != self.time_stride:
      raise ValueError('encoder and decoder time strides differ')
    if not 0 <= self.fusion_block <= len(self.encoder_channels) + 1:
      raise ValueError(f'fusion_block {self.fusion_block} out of range')
    if not -1 <= self.split_block < len(self.decoder_channels):
      raise ValueError(f'split_block {self.split_block} out of range')
    if self.quantizer.dim != self.embedding_dim:
      raise ValueError('quantizer.dim must equal embedding_dim')

  def network_differences(self, other: 'CodecConfig') -> list[str]:
    """Fields in which `other` computes differently, as 'name (a vs b)'.

    The compute dtype and the RVQ's training knobs (how codebooks learn)
    do not count: weights of one load into the other and give the same
    codes and audio, up to the dtype's rounding.
    """
    out = []
    for field in dataclasses.fields(self):
      a, b = getattr(self, field.name), getattr(other, field.name)
      if field.name == 'quantizer':
        for name in rvq.NETWORK_FIELDS:
          if getattr(a, name) != getattr(b, name):
            out.append(
              f'quantizer.{name} ({getattr(a, name)} vs {getattr(b, name)})'
            )
      elif field.name != 'dtype' and a != b:
        out.append(f'{field.name} ({a} vs {b})')
    return out

  @property
  def time_stride(self) -> int:
    """STFT frames per embedding."""
    return math.prod(s[0] for s in self.encoder_strides)

  @property
  def freq_stride(self) -> int:
    return math.prod(s[1] for s in self.encoder_strides)

  @property
  def latent_bins(self) -> int:
    return self.frame_length // 2 // self.freq_stride

  @property
  def samples_per_frame(self) -> int:
    """Audio samples per embedding (1920 at 48 kHz: 40 ms, 25 Hz)."""
    return self.hop_length * self.time_stride

  @property
  def frame_rate(self) -> float:
    return self.sample_rate / self.samples_per_frame

  @property
  def bits_per_level(self) -> int:
    return int(math.log2(self.quantizer.codebook_size))

  @property
  def kbps_per_level(self) -> float:
    return self.frame_rate * self.bits_per_level / 1000.0

  def levels_for_kbps(self, kbps: float) -> int:
    levels = kbps / self.kbps_per_level
    if abs(levels - round(levels)) > 1e-9 or not (
      1 <= round(levels) <= self.quantizer.num_levels
    ):
      raise ValueError(
        f'{kbps} kbps is not a whole number of levels in 1..'
        f'{self.quantizer.num_levels} ({self.kbps_per_level} kbps per level)'
      )
    return round(levels)

  def kbps_for_levels(self, levels: int) -> float:
    return levels * self.kbps_per_level

  @property
  def latency_samples(self) -> int:
    """Frame + decoder look-ahead, in samples."""
    return (1 + self.lookahead) * self.samples_per_frame

  @property
  def latency_ms(self) -> float:
    return 1000.0 * self.latency_samples / self.sample_rate

  @property
  def worst_case_latency_ms(self) -> float:
    """Adds the STFT window's overhang past its hop."""
    overhang = self.frame_length - self.hop_length
    return 1000.0 * (self.latency_samples + overhang) / self.sample_rate

  def output_samples(self, num_embeddings: int) -> int:
    return max(num_embeddings - self.lookahead, 0) * self.samples_per_frame

  def num_embeddings(self, num_samples: int) -> int:
    frames = signal.num_frames(num_samples, self.hop_length)
    return math.ceil(frames / self.time_stride)


def match_channels(wav: jax.Array, channels: int) -> jax.Array:
  """[..., 1 or 2] -> [..., channels]: mono duplicated, stereo averaged.

  The in-graph half of `channels.to_channels`, with the same result; more
  than two channels are mixed to stereo there, before the model.
  """
  c = wav.shape[-1]
  if c not in (1, 2) or channels not in (1, 2):
    raise ValueError(
      f'the model takes 1 or 2 channels, got {c} for {channels}; mix with '
      'channels.to_channels first'
    )
  if c == channels:
    return wav
  if c == 2:
    return jnp.mean(wav, axis=-1, keepdims=True)
  return jnp.repeat(wav, channels, axis=-1)


def stft_features(
  wav: jax.Array,
  config: CodecConfig,
  batch_sharding: jax.sharding.NamedSharding | None = None,
) -> jax.Array:
  """Waveform [B, T, C] -> encoder input [B, ceil(T/hop), bins, 2C].

  `batch_sharding`: how the batch is split over devices; each device
  then transforms only its own examples (`signal.per_device`).
  """
  wav = match_channels(wav.astype(jnp.float32), config.num_channels)
  stft = functools.partial(
    signal.stft, frame_length=config.frame_length, hop_length=config.hop_length
  )
  return signal.per_device(stft, batch_sharding)(wav)


class ResidualMLP(nn.Module):
  """`conv1x1_<linear>` + `shortcut_layer/{conv1x1_b1, conv1x1_b2}`."""

  features: int
  hidden: int
  linear_name: str
  elu_first: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    linear = layers.Dense1x1(
      self.features, name=self.linear_name, dtype=self.dtype
    )
    return linear(x) + _MLPBranch(
      self.features,
      self.hidden,
      self.elu_first,
      self.dtype,
      name='shortcut_layer',
    )(x)


class _MLPBranch(nn.Module):
  features: int
  hidden: int
  elu_first: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.elu_first:
      x = nn.elu(x)
    x = layers.Dense1x1(self.hidden, name='conv1x1_b1', dtype=self.dtype)(x)
    x = nn.elu(x)
    return layers.Dense1x1(self.features, name='conv1x1_b2', dtype=self.dtype)(
      x
    )


def _split_channels(x: jax.Array, n: int, fold: bool) -> list[jax.Array]:
  """Per-audio-channel branches of `x` (split on the feature axis).

  Folded, the branches are stacked on the batch axis as one array, so a
  shared-weight module runs once (and, streaming, keeps one history).
  """
  if not fold:
    return jnp.split(x, n, axis=-1)
  b, t, f, c = x.shape
  x = x.reshape(b, t, f, n, c // n)
  return [jnp.moveaxis(x, 3, 0).reshape(n * b, t, f, c // n)]


def _merge_channels(branches: list[jax.Array], n: int, fold: bool) -> jax.Array:
  """Inverse of `_split_channels`: branches concatenated on features."""
  if not fold:
    return jnp.concatenate(branches, axis=-1)
  (x,) = branches
  nb, t, f, c = x.shape
  x = jnp.moveaxis(x.reshape(n, nb // n, t, f, c), 0, 3)
  return x.reshape(nb // n, t, f, n * c)


class Encoder(nn.Module):
  """STFT features [B, T_f, bins, 2C] -> embeddings [B, ceil(T_f/4), D].

  `streaming`: consecutive chunks of whole embeddings (4 STFT frames each,
  the last chunk may be ragged); conv histories live in `stream`.
  """

  config: CodecConfig
  streaming: bool = False

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    n, fold = c.num_channels, self.streaming
    # Branches share weights: one module applied to each audio channel.
    branches = _split_channels(features, n, fold)
    base = layers.CausalConv2D(
      c.encoder_base_channels,
      (7, 7),
      name='base_conv_first',
      dtype=dtype,
      streaming=self.streaming,
    )
    branches = [base(b) for b in branches]
    units = [
      (f'encoder_{i}', ch, s)
      for i, (ch, s) in enumerate(
        zip(c.encoder_channels, c.encoder_strides, strict=True)
      )
    ]
    units.append(('bottleneck', c.bottleneck_channels, (1, 1)))
    for i, (name, ch, stride) in enumerate(units):
      if i == c.fusion_block:
        branches = [_merge_channels(branches, n, fold)]
        fold = False
      unit = layers.EncoderUnit(
        ch, stride, name=name, dtype=dtype, streaming=self.streaming
      )
      branches = [unit(b) for b in branches]
    x = _merge_channels(branches, n, fold)
    b, t, f, ch = x.shape
    x = x.reshape(b, t, f * ch)
    x = ResidualMLP(
      c.embedding_dim,
      hidden=f * ch,
      linear_name='conv1x1_last',
      elu_first=True,
      dtype=dtype,
      name='output_convs',
    )(x)
    return x.astype(jnp.float32)


class _OutputLayer(nn.Module):
  features: int
  dtype: jnp.dtype = jnp.float32
  streaming: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.CausalConv2D(
      self.features,
      (7, 7),
      name='base_conv_last',
      dtype=self.dtype,
      streaming=self.streaming,
    )(nn.elu(x))


class Decoder(nn.Module):
  """Embeddings [B, N, D] -> STFT features [B, 4(N - lookahead), bins, 2C].

  `streaming`: consecutive chunks of embeddings -> [B, 4N, bins, 2C]; the
  caller drops the first 4·lookahead frames of the stream.
  """

  config: CodecConfig
  streaming: bool = False

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    n, fold = c.num_channels, self.streaming
    unit_args = dict(dtype=dtype, streaming=self.streaming)
    joint = c.decoder_input_channels
    x = ResidualMLP(
      c.latent_bins * joint,
      hidden=c.latent_bins * joint,
      linear_name='conv1x1_first',
      elu_first=False,
      dtype=dtype,
      name='input_layer',
    )(emb)
    b, t, _ = x.shape
    x = x.reshape(b, t, c.latent_bins, joint)
    x = layers.DecoderUnit(
      joint, (1, 1), name='input_layers_residual_unit', **unit_args
    )(x)
    branches = [x]
    if c.split_block == -1:
      branches = _split_channels(x, n, fold)
    for i, (ch, stride) in enumerate(
      zip(c.decoder_channels, c.decoder_strides, strict=True)
    ):
      out = ch * n if i <= c.split_block else ch
      unit = layers.DecoderUnit(out, stride, name=f'decoder_{i}', **unit_args)
      branches = [unit(b) for b in branches]
      if i == c.split_block:
        branches = _split_channels(branches[0], n, fold)
    head = _OutputLayer(2, name='output_layer', **unit_args)
    x = _merge_channels([head(b) for b in branches], n, fold)
    if not self.streaming:
      x = x[:, c.lookahead * c.time_stride :]
    return x.astype(jnp.float32)


class SpectroStream(nn.Module):
  """The codec: waveform <-> embeddings <-> RVQ codes."""

  config: CodecConfig
  # Chunk-by-chunk mode of `encoder` and `decoder`; see streaming.py.
  streaming: bool = False
  # How a batch is split over devices: each device then runs the STFT and
  # inverse STFT of its own examples only (`signal.per_device`).
  batch_sharding: jax.sharding.NamedSharding | None = None

  def setup(self):
    self.encoder = Encoder(self.config, self.streaming)
    self.decoder = Decoder(self.config, self.streaming)
    self.quantizer = rvq.ResidualVectorQuantizer(self.config.quantizer)

  def features(self, wav: jax.Array) -> jax.Array:
    return stft_features(wav, self.config, self.batch_sharding)

  def embed(self, wav: jax.Array) -> jax.Array:
    """Waveform [B, T, C] -> embeddings [B, N, D]; N = ceil(T / 1920)."""
    return self.encoder(self.features(wav))

  def quantize(self, emb: jax.Array, num_levels: int | None = None):
    return self.quantizer.encode(emb, num_levels)

  def dequantize(self, codes: jax.Array) -> jax.Array:
    return self.quantizer.decode(codes)

  def encode(self, wav: jax.Array, num_levels: int | None = None):
    return self.quantize(self.embed(wav), num_levels)

  def decode_features(self, emb: jax.Array) -> jax.Array:
    return self.decoder(emb)

  def decode_embeddings(self, emb: jax.Array) -> jax.Array:
    """Embeddings [B, N, D] -> waveform [B, (N - lookahead)·1920, C]."""
    c = self.config
    istft = functools.partial(
      signal.istft, frame_length=c.frame_length, hop_length=c.hop_length
    )
    return signal.per_device(istft, self.batch_sharding)(self.decoder(emb))

  def decode(self, codes: jax.Array) -> jax.Array:
    return self.decode_embeddings(self.dequantize(codes))

  def decode_prefix(self, codes: jax.Array, num_levels: jax.Array):
    """`decode(codes[..., :num_levels])` for a traced num_levels."""
    return self.decode_embeddings(
      self.quantizer.decode_prefix(codes, num_levels)
    )

  def reconstruct(
    self, wav: jax.Array, num_levels: int | None = None
  ) -> jax.Array:
    """Round trip through the codes; also the method to `init` with."""
    return self.decode(self.encode(wav, num_levels))

  def __call__(
    self, wav: jax.Array, rng: jax.Array
  ) -> tuple[jax.Array, jax.Array, rvq.QuantizerOutput]:
    """Training forward: (reconstruction, embeddings, quantizer output)."""
    emb = self.embed(wav)
    q = self.quantizer(emb, rng)
    return self.decode_embeddings(q.decoder_input), emb, q


def production() -> CodecConfig:
  """48 kHz stereo model of Magenta RT (61,713,666 parameters)."""
  return CodecConfig()


def mono() -> CodecConfig:
  """Same network for one channel: no fusion concat, no decoder split."""
  return CodecConfig(num_channels=1)


def small() -> CodecConfig:
  """The production layout at a quarter of the width, to train on a CPU.

  Same STFT, strides, fusion, split, look-ahead, 25 Hz frames, 64 RVQ
  levels of 1024 codes; convolutions 4× narrower (about 1/16 of the conv
  FLOPs) and 128-dim embeddings.
  """
  return CodecConfig(
    encoder_base_channels=8,
    encoder_channels=(16, 16, 32, 32, 32, 64, 64),
    bottleneck_channels=64,
    embedding_dim=128,
    decoder_input_channels=128,
    decoder_channels=(128, 64, 64, 64, 32, 32, 16),
    quantizer=rvq.QuantizerConfig(dim=128),
  )


def tiny() -> CodecConfig:
  """A few thousand parameters with every structural feature, for tests."""
  return CodecConfig(
    encoder_base_channels=4,
    encoder_channels=(8, 8, 8, 8, 8, 16, 16),
    bottleneck_channels=16,
    embedding_dim=16,
    decoder_input_channels=16,
    decoder_channels=(16, 8, 8, 8, 8, 8, 4),
    quantizer=rvq.QuantizerConfig(num_levels=8, codebook_size=64, dim=16),
  )


def param_shapes(config: CodecConfig) -> dict:
  """Parameter tree of `config` as ShapeDtypeStructs (no compute)."""
  wav = jnp.zeros(
    (1, (config.lookahead + 1) * config.samples_per_frame, config.num_channels)
  )
  model = SpectroStream(config)
  return jax.eval_shape(
    lambda r: model.init(r, wav, method=model.reconstruct), jax.random.key(0)
  )['params']


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: CodecConfig, rng: jax.Array) -> dict:
  """Fresh parameters {'encoder', 'decoder', 'quantizer'} for `config`.

  Kernels are N(0, 1/fan_in), biases zero, codebooks N(0, 1) (they are
  re-initialised from data by k-means when training starts). All noise
  comes from one draw: per-parameter threefry calls make XLA's compile of
  `init` take tens of seconds on CPU. Jittable, so the trainer can create
  parameters directly with their shardings.
  """
  shapes = param_shapes(config)
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  sizes = [math.prod(leaf.shape) for _, leaf in paths]
  noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  leaves, offset = [], 0
  for (path, leaf), size in zip(paths, sizes, strict=True):
    name = path[-1].key
    chunk = noise[offset : offset + size].reshape(leaf.shape)
    offset += size
    if name == 'kernel':
      chunk = chunk / math.sqrt(math.prod(leaf.shape[:-1]))
    elif name == 'bias':
      chunk = jnp.zeros_like(chunk)
    leaves.append(chunk)
  return jax.tree.unflatten(treedef, leaves)


PRESETS = {
  'production': production,
  'mono': mono,
  'small': small,
  'tiny': tiny,
}


def get_config(name: str) -> CodecConfig:
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; choose from {sorted(PRESETS)}')
  return PRESETS[name]()

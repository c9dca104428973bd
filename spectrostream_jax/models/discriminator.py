"""Multi-scale STFT discriminators (docs/architecture.md, "Discriminators").

Each scale looks at a complex STFT of the waveform with its own window:
real, imaginary and magnitude planes of every audio channel are stacked as
feature channels, so the stereo image (inter-channel phase and level) is
judged, not just each channel alone. The network is encoder-style: a stem
conv, pre-activation residual units that stride over frequency, and a final
conv whose kernel spans all remaining bins, giving one logit per frame.
Nothing here needs to be causal, so plain centred convolutions are used.
"""

from collections.abc import Callable
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import signal
from spectrostream_jax.models import layers

# (per-frame logits [B, frames], intermediate feature maps [B, frames, F, C]).
DiscriminatorOutput = tuple[jax.Array, list[jax.Array]]

_ACTIVATIONS = ('leaky_relu', 'elu')


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  """Shape of the multi-scale discriminator. Defaults: the published ones."""

  num_channels: int = 2
  windows: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
  # hop = window // hops_per_window.
  hops_per_window: int = 4
  base_channels: int = 32
  # A strided stem halves the bins before the first unit; with (1, 1) that
  # unit's two full-resolution convs double the cost of the whole network.
  stem_stride: tuple[int, int] = (1, 2)
  # Output channels (× base_channels) and (time, freq) strides per unit.
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
  strides: tuple[tuple[int, int], ...] = ((1, 2), (1, 2), (1, 2), (1, 2))
  activation: str = 'leaky_relu'
  negative_slope: float = 0.2
  # Compute dtype ('float32' or 'bfloat16'); params are always float32.
  dtype: str = 'float32'

  def __post_init__(self):
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f'activation {self.activation!r} not in {_ACTIVATIONS}')
    if len(self.channel_multipliers) != len(self.strides):
      raise ValueError('channel_multipliers and strides differ in length')
    for window in self.windows:
      if window % self.hops_per_window:
        raise ValueError(f'window {window} not divisible into hops')
      if (window // 2) % self.freq_stride:
        raise ValueError(
          f'{window // 2} bins not divisible by freq stride {self.freq_stride}'
        )

  @property
  def freq_stride(self) -> int:
    return self.stem_stride[1] * math.prod(s[1] for s in self.strides)

  @property
  def input_channels(self) -> int:
    """re, im and |X| of every audio channel."""
    return 3 * self.num_channels


def stft_features(wav: jax.Array, window: int, hop: int) -> jax.Array:
  """Waveform [B, T, C] -> [B, 1 + T // hop, window // 2, 3C], float32.

  Frames are centred (zero padding of window // 2 on both sides, so any
  length works). Channels are [re_0, im_0, |X|_0, re_1, im_1, |X|_1, ...].
  The spectrum is divided by sqrt(Σ w²) so white noise has the same level at
  every scale, and the Nyquist bin is dropped so the bin count is a power of
  two. |X| = sqrt(re² + im² + 1e-12) keeps its gradient bounded at silence.
  """
  x = jnp.moveaxis(wav.astype(jnp.float32), -1, 1)  # [B, C, T]
  pad = window // 2
  x = jnp.pad(x, ((0, 0), (0, 0), (pad, pad)))
  frames = signal.frame(x, window, hop)[..., : 1 + wav.shape[1] // hop, :]
  w = signal.hann_window(window)
  frames = frames * jnp.asarray(w / np.sqrt(np.sum(w**2)), jnp.float32)
  spec = jnp.fft.rfft(frames, axis=-1)[..., : window // 2]
  re, im = spec.real, spec.imag
  mag = jnp.sqrt(re * re + im * im + 1e-12)
  feat = jnp.stack([re, im, mag], axis=-1)  # [B, C, F, K, 3]
  b, c, f, k, _ = feat.shape
  return jnp.transpose(feat, (0, 2, 3, 1, 4)).reshape(b, f, k, 3 * c)


def _activation(
  config: DiscriminatorConfig,
) -> Callable[[jax.Array], jax.Array]:
  if config.activation == 'elu':
    return nn.elu
  return functools.partial(nn.leaky_relu, negative_slope=config.negative_slope)


class ResidualUnit(nn.Module):
  """act → 3×3 → act → strided conv, plus pooled (projected) shortcut.

  The same shape as the codec's encoder unit (docs/architecture.md, "The
  model"), but centred in time.
  """

  features: int
  strides: tuple[int, int]
  config: DiscriminatorConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _activation(self.config)
    conv = functools.partial(
      nn.Conv, padding='SAME', dtype=jnp.dtype(self.config.dtype)
    )
    cin = x.shape[-1]
    y = conv(cin, (3, 3), name='conv_3x3')(act(x))
    y = conv(
      self.features,
      layers.resample_kernel(self.strides),
      self.strides,
      name='conv_resample',
    )(act(y))
    shortcut = layers.avg_pool(x, self.strides)
    if cin != self.features:
      shortcut = conv(self.features, (1, 1), name='shortcut')(shortcut)
    return y + shortcut


class STFTDiscriminator(nn.Module):
  """One scale: waveform [B, T, C] -> (logits [B, frames], feature maps)."""

  config: DiscriminatorConfig
  window: int
  # How a batch is split over devices (`MultiScaleSTFTDiscriminator`).
  batch_sharding: jax.sharding.NamedSharding | None = None

  @nn.compact
  def __call__(self, wav: jax.Array) -> DiscriminatorOutput:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    features = functools.partial(
      stft_features, window=self.window, hop=self.window // c.hops_per_window
    )
    x = signal.per_device(features, self.batch_sharding)(wav)
    x = nn.Conv(
      c.base_channels,
      layers.resample_kernel(c.stem_stride),
      c.stem_stride,
      padding='SAME',
      dtype=dtype,
      name='stem',
    )(x.astype(dtype))
    features = [x]
    for i, (mult, stride) in enumerate(
      zip(c.channel_multipliers, c.strides, strict=True)
    ):
      x = ResidualUnit(c.base_channels * mult, stride, c, name=f'unit_{i}')(x)
      features.append(x)
    # The kernel spans every remaining bin: frequency collapses to one logit.
    logits = nn.Conv(
      1,
      (3, x.shape[2]),
      padding=((1, 1), (0, 0)),
      dtype=dtype,
      name='logits',
    )(_activation(c)(x))
    return (
      logits[:, :, 0, 0].astype(jnp.float32),
      [f.astype(jnp.float32) for f in features],
    )


class MultiScaleSTFTDiscriminator(nn.Module):
  """All scales of `config.windows`; one `DiscriminatorOutput` per scale."""

  config: DiscriminatorConfig
  # How a batch is split over devices: each device then computes the
  # spectra of its own examples only (`signal.per_device`).
  batch_sharding: jax.sharding.NamedSharding | None = None

  @nn.compact
  def __call__(self, wav: jax.Array) -> list[DiscriminatorOutput]:
    if wav.ndim != 3 or wav.shape[-1] != self.config.num_channels:
      raise ValueError(
        f'expected [B, T, {self.config.num_channels}] audio, got {wav.shape}'
      )
    scales = [
      STFTDiscriminator(self.config, w, self.batch_sharding, name=f'stft_{w}')
      for w in self.config.windows
    ]
    return [scale(wav) for scale in scales]


def init_params(config: DiscriminatorConfig, rng: jax.Array) -> dict:
  """Fresh parameters; they do not depend on the audio length."""
  wav = jnp.zeros((1, max(config.windows), config.num_channels), jnp.float32)
  init = jax.jit(MultiScaleSTFTDiscriminator(config).init)
  return init(rng, wav)['params']

"""Causal 2D convolutions and the residual units of SpectroStream (SPEC §3).

Activations are NHWC with H = time and W = frequency. Time is causal at the
granularity of the stride ("semicausal"): an output frame never sees input
beyond the end of its own stride block. Every conv parameter lives at
`<layer>/conv/{kernel,bias}`, the official checkpoint layout.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Stride = tuple[int, int]

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def time_padding(kernel: int, stride: int) -> tuple[int, int]:
  """Semicausal time padding: output length is ceil(T / stride)."""
  return max(kernel - stride, 0), stride - 1


def freq_padding(kernel: int, stride: int) -> tuple[int, int]:
  total = max(kernel - stride, 0)
  return total // 2, total - total // 2


def resample_kernel(stride: Stride) -> tuple[int, int]:
  """Kernel of the strided slot of a unit: max(3, 2·stride) per axis."""
  return max(3, 2 * stride[0]), max(3, 2 * stride[1])


def _pad_time_to_multiple(x: jax.Array, stride: int) -> jax.Array:
  extra = -x.shape[1] % stride
  if extra:
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
  return x


class ConvParams(nn.Module):
  """Holds one conv's kernel [kt, kf, in, out] and bias (the `conv` leaf)."""

  shape: tuple[int, int, int, int]
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), self.shape, self.param_dtype
    )
    bias = self.param(
      'bias', nn.initializers.zeros, (self.shape[-1],), self.param_dtype
    )
    return kernel, bias


class CausalConv2D(nn.Module):
  """Conv2D, causal in time, centred in frequency."""

  features: int
  kernel_size: tuple[int, int]
  strides: Stride = (1, 1)
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.Precision | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kt, kf = self.kernel_size
    st, sf = self.strides
    kernel, bias = ConvParams(
      (kt, kf, x.shape[-1], self.features), name='conv'
    )()
    x = _pad_time_to_multiple(x, st)
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      window_strides=(st, sf),
      padding=(time_padding(kt, st), freq_padding(kf, sf)),
      dimension_numbers=_DIMS,
      precision=self.precision,
    )
    return y + bias.astype(self.dtype)


def _polyphase_kernel(
  kernel: jax.Array, strides: Stride, low_pads: tuple[int, int]
) -> tuple[jax.Array, tuple[int, int], tuple[int, int]]:
  """Rewrites a transposed conv as one stride-1 conv + depth-to-space.

  Returns the dense kernel [wt, wf, in, st·sf·out] and, per axis, the input
  offset of its first tap. Multiplying the inserted zeros is skipped, which
  makes the decoder ~1.5x cheaper than `lhs_dilation`.
  """
  kt, kf, cin, cout = kernel.shape
  axes = []
  for k, s, p in zip((kt, kf), strides, low_pads, strict=True):
    phases = []
    for r in range(s):
      j0 = (p - r) % s
      offset = (r + j0 - p) // s
      phases.append((j0, offset, len(range(j0, k, s))))
    lo = min(o for _, o, _ in phases)
    hi = max(o + n for _, o, n in phases)
    axes.append((phases, lo, hi - lo))
  (pt, lo_t, wt), (pf, lo_f, wf) = axes
  index = np.zeros((wt, wf, strides[0], strides[1], 2), np.int32)
  valid = np.zeros((wt, wf, strides[0], strides[1]), bool)
  for rt, (jt, ot, nt) in enumerate(pt):
    for rf, (jf, of, nf) in enumerate(pf):
      for m in range(nt):
        for n in range(nf):
          at, af = ot - lo_t + m, of - lo_f + n
          index[at, af, rt, rf] = (jt + strides[0] * m, jf + strides[1] * n)
          valid[at, af, rt, rf] = True
  dense = kernel[index[..., 0], index[..., 1]]  # [wt, wf, st, sf, in, out]
  dense = jnp.where(valid[..., None, None], dense, 0)
  dense = jnp.transpose(dense, (0, 1, 4, 2, 3, 5))
  dense = dense.reshape(wt, wf, cin, strides[0] * strides[1] * cout)
  return dense, (lo_t, wt), (lo_f, wf)


class CausalConvTranspose2D(nn.Module):
  """Transposed conv, kernel un-flipped (SPEC §3); output [T·st, F·sf].

  Output time frame o depends on input frames <= o // st.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: Stride
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.Precision | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kt, kf = self.kernel_size
    st, sf = self.strides
    b, t, f, cin = x.shape
    kernel, bias = ConvParams((kt, kf, cin, self.features), name='conv')()
    dense, (lo_t, wt), (lo_f, wf) = _polyphase_kernel(
      kernel.astype(self.dtype), self.strides, (kt - 1, kf - 2)
    )
    # Input offsets lo..lo+w-1 around each position q: pad so that output q
    # starts reading at q + lo.
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      dense,
      window_strides=(1, 1),
      padding=((-lo_t, wt - 1 + lo_t), (-lo_f, wf - 1 + lo_f)),
      dimension_numbers=_DIMS,
      precision=self.precision,
    )
    y = y.reshape(b, t, f, st, sf, self.features)
    y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(
      b, t * st, f * sf, self.features
    )
    return y + bias.astype(self.dtype)


def avg_pool(x: jax.Array, stride: Stride) -> jax.Array:
  """Average pool by `stride`; a ragged time tail is zero-padded."""
  st, sf = stride
  if st == sf == 1:
    return x
  x = _pad_time_to_multiple(x, st)
  b, t, f, c = x.shape
  return x.reshape(b, t // st, st, f // sf, sf, c).mean(axis=(2, 4))


def upsample_nearest(x: jax.Array, stride: Stride) -> jax.Array:
  st, sf = stride
  x = jnp.repeat(x, st, axis=1) if st > 1 else x
  return jnp.repeat(x, sf, axis=2) if sf > 1 else x


class EncoderUnit(nn.Module):
  """ELU → 3×3 → ELU → strided conv, plus pooled (projected) shortcut."""

  features: int
  strides: Stride
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.Precision | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kt, kf = resample_kernel(self.strides)
    conv = dict(dtype=self.dtype, precision=self.precision)
    y = CausalConv2D(cin, (3, 3), name='conv2d_3x3', **conv)(nn.elu(x))
    y = CausalConv2D(
      self.features, (kt, kf), self.strides, name=f'conv2d_{kt}x{kf}_a', **conv
    )(nn.elu(y))
    shortcut = avg_pool(x.astype(self.dtype), self.strides)
    if cin != self.features:
      shortcut = ShortcutProjection(
        self.features, name='shortcut_layer', **conv
      )(shortcut)
    return y + shortcut


class DecoderUnit(nn.Module):
  """ELU → transposed conv → ELU → 3×3, plus projected upsampled shortcut."""

  features: int
  strides: Stride
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.Precision | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = dict(dtype=self.dtype, precision=self.precision)
    if self.strides == (1, 1):
      y = CausalConv2D(self.features, (3, 3), name='conv2d_3x3_a', **conv)(
        nn.elu(x)
      )
    else:
      kt, kf = resample_kernel(self.strides)
      y = CausalConvTranspose2D(
        self.features,
        (kt, kf),
        self.strides,
        name=f'conv2dtranspose_{kt}x{kf}',
        **conv,
      )(nn.elu(x))
    y = CausalConv2D(self.features, (3, 3), name='conv2d_3x3', **conv)(
      nn.elu(y)
    )
    shortcut = x.astype(self.dtype)
    if x.shape[-1] != self.features:
      shortcut = ShortcutProjection(
        self.features, name='shortcut_layer', **conv
      )(shortcut)
    return y + upsample_nearest(shortcut, self.strides)


class ShortcutProjection(nn.Module):
  """`shortcut_layer/conv1x1`: the 1×1 projection of a residual shortcut."""

  features: int
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.Precision | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Dense1x1(
      self.features, name='conv1x1', dtype=self.dtype, precision=self.precision
    )(x)


class Dense1x1(nn.Module):
  """A 1×1 conv (kernel [1, 1, in, out]) as a matmul on the last axis."""

  features: int
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.Precision | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = ConvParams((1, 1, x.shape[-1], self.features), name='conv')()
    y = jnp.matmul(
      x.astype(self.dtype),
      kernel[0, 0].astype(self.dtype),
      precision=self.precision,
    )
    return y + bias.astype(self.dtype)

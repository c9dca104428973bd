"""Causal 2D convolutions and residual units.

See docs/architecture.md, "Causal and transposed convolutions", and, for
the streaming contract every layer here keeps, docs/streaming.md,
"Per-layer contracts".

Activations are NHWC with H = time and W = frequency. Time is causal at the
granularity of the stride ("semicausal"): an output frame never sees input
beyond the end of its own stride block. Every conv parameter lives at
`<layer>/conv/{kernel,bias}`, the official checkpoint layout.

With `streaming=True` a layer sees consecutive chunks of one long sequence
(each a whole number of its time stride, except a final ragged one) and
keeps the input frames its next chunk needs in the `stream` collection
(docs/streaming.md). A zero history is exactly the whole-sequence zero
padding, so the chunked outputs equal the whole-sequence ones.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Stride = tuple[int, int]

_DIMS = ('NHWC', 'HWIO', 'NHWC')

# A streamed step gives the embedding-rate layers 5-10 output positions.
# XLA:CPU computes such a conv with a big kernel faster, and to the same
# bits, as several convs over slices of its output channels: (at least
# this many weights, slice width), first match wins. `prepare_weights`
# cuts the kernels once, into `prepared` (docs/streaming.md, "Where the
# time goes").
OUTPUT_SLICING = ((4 * 2**20, 64), (2**19, 128))


def time_padding(kernel: int, stride: int) -> tuple[int, int]:
  """Semicausal time padding of an input already padded to whole strides.

  The output then has T / stride frames. No end padding: any would fit one
  more window of padding alone when the kernel is shorter than the stride.
  """
  return max(kernel - stride, 0), 0


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


def _with_history(module: nn.Module, x: jax.Array, frames: int) -> jax.Array:
  """Prepends the last `frames` input frames of the previous chunk."""
  if frames == 0:
    return x
  b, _, f, c = x.shape
  history = module.variable(
    'stream', 'history', jnp.zeros, (b, frames, f, c), x.dtype
  )
  x = jnp.concatenate([history.value, x], axis=1)
  history.value = x[:, -frames:]
  return x


def _output_slices(kernel: jax.Array) -> tuple[jax.Array, ...]:
  """[..., out] -> its output channels in slices (a 1-tuple if small)."""
  if jax.default_backend() != 'cpu':
    return (kernel,)
  out = kernel.shape[-1]
  for weights, width in OUTPUT_SLICING:
    if math.prod(kernel.shape) >= weights:
      if out % width or out == width:
        break
      return tuple(kernel[..., i : i + width] for i in range(0, out, width))
  return (kernel,)


def _conv_slices(conv, x: jax.Array, kernels: tuple[jax.Array, ...]):
  if len(kernels) == 1:
    return conv(x, kernels[0])
  return jnp.concatenate([conv(x, k) for k in kernels], axis=-1)


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
  streaming: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kt, kf = self.kernel_size
    st, sf = self.strides
    kernel, bias = ConvParams(
      (kt, kf, x.shape[-1], self.features), name='conv'
    )()
    kernel = kernel.astype(self.dtype)
    x = _pad_time_to_multiple(x.astype(self.dtype), st)
    pad_t = time_padding(kt, st)
    kernels = (kernel,)
    if self.streaming:
      x = _with_history(self, x, pad_t[0])
      pad_t = (0, 0)
      # Steps read the slices `prepare_weights` made; without them, whole.
      if self.has_variable('prepared', 'kernel_slices') or (
        self.is_mutable_collection('prepared')
        and len(_output_slices(kernel)) > 1
      ):
        kernels = self.variable(
          'prepared', 'kernel_slices', _output_slices, kernel
        ).value
    conv = functools.partial(
      jax.lax.conv_general_dilated,
      window_strides=(st, sf),
      padding=(pad_t, freq_padding(kf, sf)),
      dimension_numbers=_DIMS,
      precision=self.precision,
    )
    return _conv_slices(conv, x, kernels) + bias.astype(self.dtype)


def _phase_taps(kernel: int, stride: int, low_pad: int):
  """Per output phase r of a transposed conv: (first tap, offset, taps).

  The reference op is `conv_general_dilated(x, K, lhs_dilation=stride)` with
  `low_pad` zeros in front. Output o = stride·q + r reads taps j0, j0 +
  stride, ... of K at inputs q + offset, q + offset + 1, ...
  """
  phases = []
  for r in range(stride):
    j0 = (low_pad - r) % stride
    offset = (r + j0 - low_pad) // stride
    phases.append((j0, offset, len(range(j0, kernel, stride))))
  return phases


def _time_fused_kernel(kernel: jax.Array, stride: int) -> tuple[jax.Array, int]:
  """[kt, kf, in, out] -> ([w, kf, in, stride·out], first input offset).

  All time phases of the transposed conv become output channels of one
  stride-1 conv (a tap a phase does not use is zero; for kt = 2·stride the
  phases share their window, so none is wasted).
  """
  kt, kf, cin, cout = kernel.shape
  phases = _phase_taps(kt, stride, kt - 1)
  lo = min(off for _, off, _ in phases)
  width = max(off + n for _, off, n in phases) - lo
  index = np.zeros((width, stride), np.int32)
  valid = np.zeros((width, stride), bool)
  for r, (j0, off, n) in enumerate(phases):
    for m in range(n):
      index[off - lo + m, r] = j0 + stride * m
      valid[off - lo + m, r] = True
  taps = jnp.transpose(kernel[index], (0, 2, 3, 1, 4))  # [w, kf, in, st, out]
  dense = jnp.where(valid[:, None, None, :, None], taps, 0)
  return dense.reshape(width, kf, cin, stride * cout), lo


class CausalConvTranspose2D(nn.Module):
  """Transposed conv, kernel un-flipped; output [T·st, F·sf].

  Output time frame o depends on input frames <= o // st.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: Stride
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.Precision | str | None = None
  streaming: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kt, kf = self.kernel_size
    st, sf = self.strides
    b, t, f, cin = x.shape
    kernel, bias = ConvParams((kt, kf, cin, self.features), name='conv')()
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    # Input frames before q that output block q reads, and after it.
    taps = _phase_taps(kt, st, kt - 1)
    past = -min(off for _, off, _ in taps)
    future = max(off + n for _, off, n in taps) - 1
    pad_t = (past, future)
    if self.streaming:
      if future:
        raise ValueError(f'transposed conv {self.kernel_size} is not causal')
      x = _with_history(self, x, past)
      pad_t = (0, 0)
      # The re-laid-out kernels cost a copy of the weights per call, which
      # a 40 ms step cannot amortise: computed once, kept in `prepared`,
      # big ones in output slices.
      kernels = self.variable(
        'prepared',
        'phase_kernels',
        lambda k: [_output_slices(d) for d in self._phase_kernels(k)],
        kernel,
      ).value
    else:
      kernels = [(d,) for d in self._phase_kernels(kernel)]
    outs = []
    for dense, (_, off, n) in zip(
      kernels, _phase_taps(kf, sf, kf - 2), strict=True
    ):
      conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=(1, 1),
        padding=(pad_t, (-off, n - 1 + off)),
        dimension_numbers=_DIMS,
        precision=self.precision,
      )
      y = _conv_slices(conv, x, tuple(dense))
      outs.append(y.reshape(b, t, f, st, self.features))
    y = jnp.stack(outs, axis=4)  # [b, t, f, st, sf, out]
    y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(
      b, t * st, f * sf, self.features
    )
    return y + bias.astype(self.dtype)

  def _phase_kernels(self, kernel: jax.Array) -> list[jax.Array]:
    """One stride-1 kernel per frequency phase, time phases fused.

    Time phases become output channels; frequency phases stay separate
    convs (fusing them too multiplies zero taps and measured slower).
    """
    st, sf = self.strides
    kf = self.kernel_size[1]
    return [
      _time_fused_kernel(kernel[:, j0::sf], st)[0]
      for j0, _, _ in _phase_taps(kf, sf, kf - 2)
    ]


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
  streaming: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kt, kf = resample_kernel(self.strides)
    conv = dict(
      dtype=self.dtype, precision=self.precision, streaming=self.streaming
    )
    y = CausalConv2D(cin, (3, 3), name='conv2d_3x3', **conv)(nn.elu(x))
    y = CausalConv2D(
      self.features, (kt, kf), self.strides, name=f'conv2d_{kt}x{kf}_a', **conv
    )(nn.elu(y))
    shortcut = avg_pool(x.astype(self.dtype), self.strides)
    if cin != self.features:
      shortcut = ShortcutProjection(
        self.features,
        name='shortcut_layer',
        dtype=self.dtype,
        precision=self.precision,
      )(shortcut)
    return y + shortcut


class DecoderUnit(nn.Module):
  """ELU → transposed conv → ELU → 3×3, plus projected upsampled shortcut."""

  features: int
  strides: Stride
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.Precision | str | None = None
  streaming: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = dict(
      dtype=self.dtype, precision=self.precision, streaming=self.streaming
    )
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
        self.features,
        name='shortcut_layer',
        dtype=self.dtype,
        precision=self.precision,
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
    if x.ndim == 4:
      y = jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        (1, 1),
        'VALID',
        dimension_numbers=_DIMS,
        precision=self.precision,
      )
    else:
      y = jnp.matmul(
        x.astype(self.dtype),
        kernel[0, 0].astype(self.dtype),
        precision=self.precision,
      )
    return y + bias.astype(self.dtype)

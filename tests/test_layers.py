"""Convolutions and residual units against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectrostream_jax.models import layers


def reference_transpose(x, kernel, strides):
  """Transposed conv: un-flipped kernel, lhs_dilation, fixed pads."""
  kt, kf = kernel.shape[:2]
  st, sf = strides
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    ((kt - 1, st - 1), (kf - 2, sf)),
    lhs_dilation=strides,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


@pytest.mark.parametrize(
  'strides', [(2, 1), (2, 2), (1, 2), (1, 3), (1, 1), (3, 2)]
)
def test_polyphase_transpose_equals_lhs_dilation(strides):
  kt, kf = layers.resample_kernel(strides)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
  k = rng.standard_normal((kt, kf, 3, 4)).astype(np.float32)
  conv = layers.CausalConvTranspose2D(4, (kt, kf), strides)
  params = {'params': {'conv': {'kernel': k, 'bias': np.zeros(4, np.float32)}}}
  ours = conv.apply(params, x)
  ref = reference_transpose(x, k, strides)
  assert ours.shape == ref.shape == (2, 5 * strides[0], 7 * strides[1], 4)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize('strides', [(1, 2), (2, 2), (2, 1), (1, 3)])
def test_conv_lengths_and_causality(strides):
  kt, kf = layers.resample_kernel(strides)
  conv = layers.CausalConv2D(3, (kt, kf), strides)
  x = np.random.default_rng(1).standard_normal((1, 9, 12, 2))
  x = x.astype(np.float32)
  params = conv.init(jax.random.key(0), x)
  y = conv.apply(params, x)
  assert y.shape == (1, -(-9 // strides[0]), 12 // strides[1], 3)
  x2 = x.copy()
  x2[:, 6:] += 1.0  # Change frames >= 6.
  y2 = conv.apply(params, x2)
  last_clean = 6 // strides[0]  # Output frames whose block ends before 6.
  np.testing.assert_array_equal(y[:, :last_clean], y2[:, :last_clean])
  assert not np.allclose(y[:, last_clean], y2[:, last_clean])


def test_transpose_output_frame_depends_on_inputs_up_to_floor():
  conv = layers.CausalConvTranspose2D(2, (4, 4), (2, 2))
  x = np.random.default_rng(2).standard_normal((1, 6, 4, 3))
  x = x.astype(np.float32)
  params = conv.init(jax.random.key(0), x)
  y = conv.apply(params, x)
  x2 = x.copy()
  x2[:, 3:] = 0.0
  y2 = conv.apply(params, x2)
  np.testing.assert_array_equal(y[:, :6], y2[:, :6])  # o // 2 < 3
  assert not np.allclose(y[:, 6], y2[:, 6])


def test_avg_pool_counts_padded_zeros():
  x = jnp.ones((1, 3, 4, 1))
  y = layers.avg_pool(x, (2, 2))
  np.testing.assert_allclose(y[0, :, 0, 0], [1.0, 0.5])


@pytest.mark.parametrize(
  'unit,strides,cin,cout,names',
  [
    (
      layers.EncoderUnit,
      (1, 3),
      4,
      8,
      {'conv2d_3x3', 'conv2d_3x6_a', 'shortcut_layer'},
    ),
    (layers.EncoderUnit, (1, 1), 4, 4, {'conv2d_3x3', 'conv2d_3x3_a'}),
    (
      layers.DecoderUnit,
      (2, 2),
      8,
      4,
      {'conv2dtranspose_4x4', 'conv2d_3x3', 'shortcut_layer'},
    ),
    (layers.DecoderUnit, (1, 1), 4, 4, {'conv2d_3x3_a', 'conv2d_3x3'}),
  ],
)
def test_unit_parameter_names_and_shapes(unit, strides, cin, cout, names):
  x = jnp.zeros((1, 4, 6, cin))
  m = unit(cout, strides)
  params = m.init(jax.random.key(0), x)['params']
  assert set(params) == names
  y = m.apply({'params': params}, x)
  if unit is layers.EncoderUnit:
    assert y.shape == (1, 4 // strides[0], 6 // strides[1], cout)
  else:
    assert y.shape == (1, 4 * strides[0], 6 * strides[1], cout)

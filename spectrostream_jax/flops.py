"""FLOPs of a JAX program and model FLOP utilisation (MFU), on any backend.

XLA's cost analysis cannot serve here: on a GPU the compiled program runs
its convolutions as cuDNN library calls, which the analysis counts as zero
(the trainer logged 94.9 GFLOP per step of the small model at batch 64 on
an H200, where this module counts 1004 for a warm-up step and 1429 for a
GAN step), and the unoptimised `jit(f).lower(...).cost_analysis()` raises
on every PJRT plug-in backend (GPU, TPU). So the count is taken from the
program's jaxpr, before any backend sees it: every `dot_general` and
`conv_general_dilated`, convolution taps that fall on padding or on the
holes of a dilated input left out, as XLA's own analysis counts them
(tests/test_flops.py checks the two agree on CPU). Element-wise work, FFTs
and reductions are left out, as MFU conventionally does.

The jaxpr of a `jit` over global arrays is the global program: the count is
for the whole batch on all devices, so MFU divides by all devices' peak.

Typical use, with a program traced once for both the count and the compile:

    traced = jax.jit(step).trace(state, batch)
    step_flops = flops.of_jaxpr(traced.jaxpr)
    compiled = traced.lower().compile()
    ...
    flops.mfu(step_flops, seconds_per_step, 'bfloat16')
"""

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np


def count(fn: Callable, *args: Any) -> float:
  """Global FLOPs of one call `fn(*args)`; args may be ShapeDtypeStructs."""
  return of_jaxpr(jax.make_jaxpr(fn)(*args))


def of_jaxpr(jaxpr: jex.ClosedJaxpr | jex.Jaxpr) -> float:
  """FLOPs of the matrix products and convolutions in a jaxpr."""
  return sum(by_primitive(jaxpr).values())


def by_primitive(jaxpr: jex.ClosedJaxpr | jex.Jaxpr) -> dict[str, float]:
  """{'dot_general': …, 'conv_general_dilated': …} of a jaxpr.

  Nested programs (jit, custom derivatives, remat) count once per call, a
  scan body once per iteration, the costlier branch of a cond, and a while
  loop's body once (its trip count is not known before it runs).
  """
  totals = {'dot_general': 0.0, 'conv_general_dilated': 0.0}
  _walk(getattr(jaxpr, 'jaxpr', jaxpr), 1.0, totals)
  return totals


def _walk(jaxpr: jex.Jaxpr, times: float, totals: dict) -> None:
  for eqn in _live(jaxpr):
    name = eqn.primitive.name
    if name == 'dot_general':
      totals[name] += times * _dot(eqn)
    elif name == 'conv_general_dilated':
      totals[name] += times * _conv(eqn)
    elif name == 'cond':
      # Only one branch runs: the costlier one bounds the work.
      branches = []
      for branch in eqn.params['branches']:
        sub = dict.fromkeys(totals, 0.0)
        _walk(branch.jaxpr, times, sub)
        branches.append(sub)
      best = max(branches, key=lambda s: sum(s.values()))
      for k, v in best.items():
        totals[k] += v
    else:
      n = eqn.params['length'] if name == 'scan' else 1
      for sub in jex.jaxprs_in_params(eqn.params):
        _walk(sub, times * n, totals)


def _live(jaxpr: jex.Jaxpr) -> list[jex.JaxprEqn]:
  """The equations that reach an output or have effects.

  A jaxpr keeps work whose result is dropped (the primal output of a
  `jax.grad`), which lowering removes before anything runs.
  """
  needed = {v for v in jaxpr.outvars if isinstance(v, jex.Var)}
  live = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in needed for v in eqn.outvars):
      live.append(eqn)
      needed.update(v for v in eqn.invars if isinstance(v, jex.Var))
  return live[::-1]


def _dot(eqn) -> float:
  """2·(output elements)·(contracted size)."""
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  k = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def _conv(eqn) -> float:
  """2·(multiply-adds that read the input, not its padding or holes).

  Each output element sums over the kernel's input features (already
  divided by the feature groups) and its taps; per spatial dimension only
  the (output, tap) pairs that land on a real input element count.
  """
  p = eqn.params
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  lhs_spec, rhs_spec, out_spec = p['dimension_numbers']
  pairs = 1
  for d in range(len(lhs_spec) - 2):
    pairs *= _valid_pairs(
      lhs.shape[lhs_spec[2 + d]],
      rhs.shape[rhs_spec[2 + d]],
      out.shape[out_spec[2 + d]],
      p['window_strides'][d],
      p['padding'][d][0],
      p['lhs_dilation'][d],
      p['rhs_dilation'][d],
    )
  per_tap = (
    out.shape[out_spec[0]] * out.shape[out_spec[1]] * rhs.shape[rhs_spec[1]]
  )
  return 2.0 * per_tap * pairs


def _valid_pairs(
  size: int,
  taps: int,
  outputs: int,
  stride: int,
  pad_low: int,
  lhs_dilation: int,
  rhs_dilation: int,
) -> int:
  """(output, tap) pairs of one dimension that read a real input element."""
  o = np.arange(outputs)[:, None]
  k = np.arange(taps)[None, :]
  i = o * stride - pad_low + k * rhs_dilation  # In the dilated input.
  real = (i >= 0) & (i <= (size - 1) * lhs_dilation) & (i % lhs_dilation == 0)
  return int(real.sum())


# Peaks -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense peak FLOP/s of one chip, from its vendor's datasheet.

  `float32` is the rate of float32 matrix products at JAX's default
  precision: TF32 tensor cores on NVIDIA GPUs, one bfloat16 pass on TPUs.
  """

  name: str
  bfloat16: float
  float32: float
  source: str

  def of(self, dtype: str) -> float:
    return self.bfloat16 if dtype == 'bfloat16' else self.float32


TERA = 1e12
# NVIDIA quotes tensor-core rates "with sparsity"; the dense rate is half.
# Matched against `device_kind` in this order (the first substring wins).
PEAKS = (
  Peak(
    'H200',
    989.5 * TERA,
    494.5 * TERA,
    'https://www.nvidia.com/en-us/data-center/h200/',
  ),
  Peak(
    'H100',
    989.5 * TERA,
    494.5 * TERA,
    'https://www.nvidia.com/en-us/data-center/h100/',
  ),
  Peak(
    'A100',
    312 * TERA,
    156 * TERA,
    'https://www.nvidia.com/en-us/data-center/a100/',
  ),
  Peak(
    'TPU v5 lite',
    197 * TERA,
    197 * TERA,
    'https://cloud.google.com/tpu/docs/v5e',
  ),
  Peak(
    'TPU v5', 459 * TERA, 459 * TERA, 'https://cloud.google.com/tpu/docs/v5p'
  ),
  Peak(
    'TPU v4', 275 * TERA, 275 * TERA, 'https://cloud.google.com/tpu/docs/v4'
  ),
)


def peak(device_kind: str | None = None) -> Peak | None:
  """The table's entry for a device kind (default: the first device's)."""
  kind = device_kind or jax.devices()[0].device_kind
  return next((p for p in PEAKS if p.name in kind), None)


def mfu(
  flops: float,
  seconds: float,
  dtype: str,
  devices: int | None = None,
  device_kind: str | None = None,
) -> float | None:
  """flops / seconds over the peak of all devices; None off the table.

  `flops` is a global count (of_jaxpr, count); `devices` defaults to
  every device JAX sees, `dtype` is the compute dtype ('bfloat16' or
  'float32').
  """
  p = peak(device_kind)
  if p is None:
    return None
  n = devices or jax.device_count()
  return flops / seconds / (n * p.of(dtype))

"""How precisely float32 programs multiply: the policy of docs/precision.md.

Unless a program asks otherwise, XLA runs a float32 convolution or matrix
product at reduced precision on GPUs from Ampere on (TF32) and on TPUs
(one bfloat16 pass), and codes then differ from a CPU's and from Google's.
A mode names what a program asks for; the names are JAX's
(`jax.default_matmul_precision`):

- 'float32' (the default): full float32 products on every platform
  (HIGHEST in the StableHLO);
- 'tensorfloat32': HIGH, TF32 on GPUs, three bfloat16 passes on TPUs;
- 'bfloat16': DEFAULT, TF32 on GPUs, one bfloat16 pass on TPUs; for
  inference the network's convolutions also run in bfloat16.

CPUs compute float32 at any mode. Every inference program (`Codec`'s, the
streaming steps, the exported StableHLO) is traced inside `traced`, so the
mode holds whatever the caller has set; training names its mode in
`StepConfig.matmul_precision`. FFTs have no precision setting.
"""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import jax

MODES = ('float32', 'tensorfloat32', 'bfloat16')
DEFAULT = 'float32'


def check(mode: Any) -> str:
  """`mode` if it is one of MODES; a one-line ValueError otherwise."""
  if not isinstance(mode, str) or mode not in MODES:
    raise ValueError(
      f'precision must be one of {", ".join(MODES)}, got {mode!r}'
    )
  return mode


def products(mode: str):
  """A context in which traced convolutions and dots ask for `mode`.

  It acts when a function is traced; jit keeps one trace per setting.
  """
  return jax.default_matmul_precision(check(mode))


def traced(fn: Callable, mode: str) -> Callable:
  """`fn` run inside `products(mode)`; jit the result.

  Inside the traced function, the mode overrides any precision the caller
  (or JAX_DEFAULT_MATMUL_PRECISION) has set.
  """
  check(mode)

  @functools.wraps(fn)
  def run(*args, **kwargs):
    with products(mode):
      return fn(*args, **kwargs)

  return run


def inference_config(config, mode: str):
  """A CodecConfig computing in `mode`'s dtype: bfloat16 for 'bfloat16'.

  The dtype a model was trained in (hardware/gpu8.gin's bfloat16, say)
  does not carry over to inference.
  """
  dtype = 'bfloat16' if check(mode) == 'bfloat16' else 'float32'
  return dataclasses.replace(config, dtype=dtype)

"""Streaming contract: a layer stepped chunk by chunk equals the whole call.

In the spirit of google/sequence-layers, where every streaming layer has a
whole-sequence `layer()` and a stateful `step()` and one test proves they
agree. Here both are the same Flax module built with `streaming=False` and
`streaming=True`; the step threads the `stream` collection (conv input
histories, `layers._with_history`) from one chunk to the next.

The contract, as the code defines it (models/layers.py):

- Time is axis 1 of input and output. A layer consumes `block` input frames
  per output block: the product of the time strides it contains (4 STFT
  frames for the Encoder, 1 for stride-1 and transposed convs).
- Every chunk but the last is a whole number of blocks. The last may be
  ragged: each strided conv zero-pads it to a whole block, which is the
  zero padding the whole-sequence call gives the sequence's end. A ragged
  chunk in the middle is outside the contract (its padding would land in
  the history), and the helper rejects such a chunking.
- A zero `stream` state is the whole-sequence zero padding at the start,
  so the first chunk needs no special case.
- The state's structure and shapes never change from step to step (it is
  donated, and a `lax.scan` needs that).
- Collections other than `stream` and `params` (the transposed convs'
  `prepared` phase kernels) are computed once and are read-only in steps.
- The concatenated step outputs, less their first `output_latency` frames
  (the Decoder's look-ahead, which its whole call drops), equal the whole
  output to float32 round-off.

Passing with one block per step also shows that the whole-sequence layer is
causal at block granularity: the step never saw later input.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Chunking = tuple[int, ...]


def cut(length: int, sizes: Sequence[int]) -> Chunking:
  """`length` frames cut into chunks of `sizes`; the last takes the rest."""
  out, left = [], length
  for size in sizes:
    if left <= 0:
      break
    out.append(int(min(size, left)))
    left -= out[-1]
  if left > 0:
    raise ValueError(f'sizes {sizes} do not cover {length} frames')
  return tuple(out)


def default_chunkings(
  length: int,
  block: int = 1,
  seed: int = 0,
  num_random: int = 3,
  max_blocks: int = 3,
  at_once: bool = True,
) -> list[Chunking]:
  """Chunkings of `length` input frames that exercise the contract.

  One block per step (the live case; more steps than a history is long),
  `max_blocks` blocks per step, `num_random` random runs of 1 to
  `max_blocks` blocks, and (`at_once`) the whole sequence as one chunk.
  Each ends with the remainder, ragged when `block` does not divide
  `length`. Every distinct chunk length costs a compile of the step, so
  tests of big models keep `max_blocks` small.
  """
  rng = np.random.default_rng(seed)
  steps = length // block + 1
  found = [
    cut(length, [block] * steps),
    cut(length, [max_blocks * block] * steps),
  ]
  for _ in range(num_random):
    found.append(cut(length, block * rng.integers(1, max_blocks + 1, steps)))
  if at_once:
    found.append((length,))
  return list(dict.fromkeys(found))  # In order, without repeats.


def _check_chunking(chunking: Chunking, length: int, block: int) -> None:
  if not chunking or sum(chunking) != length or min(chunking) < 1:
    raise ValueError(f'chunking {chunking} does not cut {length} frames')
  if any(c % block for c in chunking[:-1]):
    raise ValueError(
      f'chunking {chunking}: only the last chunk may be a partial block of '
      f'{block} frames'
    )


def _zeros(tree):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def _shapes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def random_params(module: nn.Module, x: Any, seed: int = 0) -> Any:
  """`params` of `module` for input `x`, drawn by NumPy: no XLA compile.

  Kernels N(0, 1/fan_in) as `codec.init_params`; biases N(0, 0.1²), not
  zero, so a misaligned padded frame shows up in the output too.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(s):
    scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
    return jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)

  return jax.tree.map(draw, shapes.get('params', {}))


# XLA options for `optimize=False`: about a third of the compile time, and
# code still quick enough for short sequences.
_QUICK_COMPILE = {
  'xla_backend_optimization_level': 0,
  'xla_llvm_disable_expensive_passes': True,
}


def _compiled(fn: Callable, optimize: bool) -> Callable:
  """`jax.jit(fn)`, or the same compiled with `_QUICK_COMPILE`."""
  jitted = jax.jit(fn)
  if optimize:
    return jitted
  cache = {}

  def call(*args):
    leaves, tree = jax.tree.flatten(args)
    key = tree, tuple((a.shape, a.dtype) for a in leaves)
    if key not in cache:
      lowered = jitted.lower(*args)
      cache[key] = lowered.compile(compiler_options=_QUICK_COMPILE)
    return cache[key](*args)

  return call


def assert_streams_like_whole(
  make_module: Callable[[bool], nn.Module],
  x: Any,
  *,
  block: int = 1,
  params: Any = None,
  chunkings: Sequence[Sequence[int]] | None = None,
  seed: int = 0,
  output_latency: int = 0,
  expect_state: bool = True,
  rtol: float = 1e-5,
  atol: float = 1e-5,
  optimize: bool = True,
) -> dict[Chunking, float]:
  """Asserts the streaming contract above for one module on input `x`.

  Args:
    make_module: `streaming -> module`, the same layer in both modes.
    x: [B, T, ...] input, B >= 2 with different content per element.
    block: input frames per output block (the product of time strides).
    params: the `params` collection; None draws `random_params`.
    chunkings: chunk lengths in input frames; default `default_chunkings`.
    seed: seeds the default chunkings and the parameters.
    output_latency: leading stream output frames the whole call drops.
    expect_state: the layer keeps history. If so, stepping with the state
      reset to zeros before every chunk must NOT match (a layer that ignored
      its history would pass the contract vacuously); if not, the state
      must be empty.
    rtol: relative tolerance of the comparison.
    atol: absolute tolerance of the comparison.
    optimize: compile with XLA's optimisations. Compiling dominates the
      test of a small layer; without them it is about 3× quicker (whole
      and step compiled alike), but big layers then run slower.

  Returns:
    The max absolute error per chunking, for reporting.
  """
  x = jnp.asarray(x)
  length = x.shape[1]
  # Folding audio channels into the batch (codec.py) in the wrong order
  # would mix batch elements; only distinct elements can show it.
  if x.shape[0] < 2 or np.array_equal(x[0], x[1]):
    raise ValueError('x needs a batch of >= 2 different elements')
  chunkings = [
    tuple(c) for c in chunkings or default_chunkings(length, block, seed)
  ]
  for chunking in chunkings:
    _check_chunking(chunking, length, block)
  whole_module, step_module = make_module(False), make_module(True)
  if params is None:
    params = random_params(whole_module, x, seed)
  whole = _compiled(whole_module.apply, optimize)
  want = np.asarray(whole({'params': params}, x))

  def first_call(variables, chunk):
    _, new = step_module.apply(variables, chunk, mutable=['stream', 'prepared'])
    return new

  # As streaming.init_*_state: shapes without compute, then zeros.
  first = x[:, : min(block, length)]
  shapes = jax.eval_shape(first_call, {'params': params}, first)
  state0 = _zeros(shapes.get('stream', {}))
  variables = {'params': params}
  if 'prepared' in shapes:  # Computed once, as streaming.prepare_weights.
    # Only `prepared` is returned, so XLA drops the rest of the call.
    prepare = _compiled(lambda v, c: first_call(v, c)['prepared'], optimize)
    variables['prepared'] = prepare(variables, first)
  if expect_state:
    assert jax.tree.leaves(state0), 'the streaming layer keeps no state'
  else:
    assert not jax.tree.leaves(state0), f'unexpected state {_shapes(state0)}'

  def step_fn(variables, state, chunk):
    y, new = step_module.apply(
      {**variables, 'stream': state}, chunk, mutable=['stream']
    )
    return y, new.get('stream', {})

  step = _compiled(step_fn, optimize)  # Compiles once per chunk length.

  def run(chunking, reset=False):
    outs, state, start = [], state0, 0
    for size in chunking:
      chunk = x[:, start : start + size]
      y, state = step(variables, state0 if reset else state, chunk)
      assert _shapes(state) == _shapes(state0), 'the state changed shape'
      outs.append(np.asarray(y))
      start += size
    return np.concatenate(outs, axis=1)[:, output_latency:]

  errors = {}
  for chunking in chunkings:
    got = run(chunking)
    assert got.shape == want.shape, (
      f'chunking {chunking}: streamed {got.shape}, whole {want.shape}'
    )
    np.testing.assert_allclose(
      got, want, rtol=rtol, atol=atol, err_msg=f'chunking {chunking}'
    )
    errors[chunking] = float(np.max(np.abs(got - want), initial=0.0))

  if expect_state:
    most = max(chunkings, key=len)
    forgetful = run(most, reset=True)
    assert not np.allclose(forgetful, want, rtol=rtol, atol=atol), (
      f'chunking {most}: a zero state every step also matches the '
      'whole call, so this input cannot show that the state is used'
    )
  return errors

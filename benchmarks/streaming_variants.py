"""What the streaming steps' CPU layouts buy, A against B in one process.

    python benchmarks/streaming_variants.py [--calls 40] [--update-docs]

Two layouts of `streaming.prepare_weights` are measured against what
they replaced, calls interleaved so that both sides see the same load
(docs/streaming.md, "What changed, and what did not help"):

- output slices: the decode and encode steps with the big conv kernels
  cut into output-channel slices (`layers.OUTPUT_SLICING`) against the
  same steps with whole kernels, at 1 and 4 frames per call; with the
  largest difference of their outputs.
- codebook search: the encode step's 64-level search as two 1×1 convs per
  level (`streaming._quantize`) against one product per level on
  per-level codebook buffers (`rvq.nearest_code`, the layout it replaced),
  on the embeddings of real encoder steps, a 256 MB read before every
  call so that the codebooks come from memory as in a step; with whether
  the codes agree.

Prints JSON; `--update-docs` writes its section of docs/benchmarks.md.
"""

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import layers
from spectrostream_jax.models import quantizer as rvq

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report


def _weights(codec: Codec, slicing) -> dict:
  """`prepare_weights` under another slicing rule (traced afresh)."""
  default = layers.OUTPUT_SLICING
  layers.OUTPUT_SLICING = slicing
  jax.clear_caches()
  try:
    return streaming.prepare_weights(codec.config, codec.params)
  finally:
    layers.OUTPUT_SLICING = default
    jax.clear_caches()


def _interleaved(calls: int, steps: dict) -> tuple[dict, dict]:
  """Median ms of each `steps[name]()` (-> output), and the outputs."""
  times = {name: [] for name in steps}
  outs = {name: [] for name in steps}
  for i in range(calls + 3):
    for name, step in steps.items():
      start = time.perf_counter()
      out = np.asarray(step())
      if i >= 3:  # The first calls compile and warm the caches.
        times[name].append(1000 * (time.perf_counter() - start))
        outs[name].append(out)
  return {n: float(np.median(t)) for n, t in times.items()}, outs


def _prepared_bytes(weights: dict) -> int:
  """Bytes of the weights' leaves that are not the params' own arrays."""
  params = {
    id(x)
    for k in ('encoder', 'decoder', 'codebooks')
    for x in jax.tree.leaves(weights[k])
  }
  return sum(
    x.size * x.dtype.itemsize
    for x in jax.tree.leaves(weights)
    if id(x) not in params
  )


def _max_diff(a: list, b: list) -> float:
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def output_slices(codec: Codec, calls: int) -> dict:
  cfg = codec.config
  variants = {
    'whole': _weights(codec, ()),
    'sliced': _weights(codec, layers.OUTPUT_SLICING),
  }
  rng = np.random.default_rng(0)
  levels = cfg.quantizer.num_levels
  # Memory `prepare_weights` adds to the codec's params, per layout.
  result = {
    f'{v}_prepared_mb': round(_prepared_bytes(w) / 1e6, 1)
    for v, w in variants.items()
  }
  for frames in (1, 4):
    codes = jnp.asarray(
      rng.integers(0, cfg.quantizer.codebook_size, (1, frames, levels)),
      jnp.int32,
    )
    window = jnp.asarray(
      rng.uniform(
        -0.5,
        0.5,
        (1, frames * cfg.samples_per_frame + cfg.hop_length, 2),
      ),
      jnp.float32,
    )
    for name, init, step, x, extra in (
      (
        'decode',
        streaming.init_decoder_state,
        streaming.decode_step,
        codes,
        (),
      ),
      (
        'encode',
        streaming.init_encoder_state,
        streaming.encode_step,
        window,
        (levels,),
      ),
    ):
      states = {v: init(cfg, w) for v, w in variants.items()}

      def call(v, step=step, x=x, extra=extra, states=states):
        states[v], *out = step(cfg, variants[v], states[v], x, *extra)
        return out[-1]

      ms, outs = _interleaved(
        calls, {v: functools.partial(call, v) for v in variants}
      )
      result[f'{name}_{frames}_frames'] = {
        'whole_kernels_ms': round(ms['whole'], 2),
        'sliced_ms': round(ms['sliced'], 2),
        'max_abs_diff': _max_diff(outs['whole'], outs['sliced']),
      }
  return result


@functools.partial(jax.jit, static_argnums=3)
def _search_by_products(codebooks, norms, emb, num_levels):
  """The search `streaming._quantize` replaced: a product per level."""
  codes = []
  for codebook, sq_norms in zip(
    codebooks[:num_levels], norms[:num_levels], strict=True
  ):
    code = rvq.nearest_code(emb, codebook, sq_norms)
    emb = emb - jnp.take(codebook, code, axis=0)
    codes.append(code)
  return jnp.stack(codes, axis=-1)


def codebook_search(codec: Codec, calls: int) -> dict:
  cfg = codec.config
  weights = codec.streaming_weights
  levels = cfg.quantizer.num_levels
  per_level = tuple(jnp.array(c) for c in weights['codebooks'])
  norms = weights['code_norms']
  window = np.random.default_rng(1).uniform(
    -0.5, 0.5, (1, cfg.samples_per_frame + cfg.hop_length, 2)
  )
  state = streaming.init_encoder_state(cfg, weights)
  _, emb, _ = streaming.encode_step(
    cfg, weights, state, jnp.asarray(window, jnp.float32), None
  )
  convs = jax.jit(streaming._quantize, static_argnums=2)  # noqa: SLF001
  evict = jax.jit(jnp.sum)
  other = jnp.ones((64, 2**20), jnp.float32)  # 256 MB.

  def cold(fn, *args):
    evict(other).block_until_ready()
    return fn(*args)

  ms, outs = _interleaved(
    calls,
    {
      'one_product_per_level': lambda: cold(
        _search_by_products, per_level, norms, emb, levels
      ),
      'two_convs_per_level': lambda: cold(convs, weights, emb, levels),
    },
  )
  # The read before each call is timed too; measured alone, subtracted.
  read, _ = _interleaved(calls, {'read': lambda: evict(other)})
  return {
    'levels': levels,
    'one_product_per_level_ms': round(
      ms['one_product_per_level'] - read['read'], 2
    ),
    'two_convs_per_level_ms': round(
      ms['two_convs_per_level'] - read['read'], 2
    ),
    'eviction_read_ms': round(read['read'], 2),
    'codes_equal': all(
      np.array_equal(a, b)
      for a, b in zip(
        outs['one_product_per_level'], outs['two_convs_per_level'], strict=True
      )
    ),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='production')
  ap.add_argument('--calls', type=int, default=40)
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()
  codec = Codec.random(codec_lib.get_config(args.preset))
  result = {
    'benchmark': 'streaming_variants',
    'preset': args.preset,
    'calls': args.calls,
    'output_slicing': [list(r) for r in layers.OUTPUT_SLICING],
    **report.environment(),
    'load_before': [round(x, 2) for x in os.getloadavg()],
    'output_slices': output_slices(codec, args.calls),
    'codebook_search': codebook_search(codec, args.calls),
    'load_after': [round(x, 2) for x in os.getloadavg()],
  }
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('streaming_variants', result, markdown)


def markdown(r: dict) -> str:
  s, q = r['output_slices'], r['codebook_search']
  lines = [
    '## Streaming layouts, A against B',
    '',
    f'{r["preset"]} model, median ms per call of {r["calls"]} interleaved '
    'calls (docs/streaming.md, "What changed, and what did not help"). '
    'Load average '
    f'{", ".join(f"{x:g}" for x in r["load_before"])} before.',
    '',
    'Big conv kernels in output-channel slices '
    f'(`layers.OUTPUT_SLICING` = {r["output_slicing"]}) against whole '
    'kernels, 64-level codes:',
    '',
    '| step | whole kernels | sliced | largest output difference |',
    '|---|---|---|---|',
  ]
  for key, row in s.items():
    if not isinstance(row, dict):
      continue
    name, frames, _ = key.split('_')
    lines.append(
      f'| {name}, {frames} frame(s) per call | {row["whole_kernels_ms"]} ms '
      f'| {row["sliced_ms"]} ms | {row["max_abs_diff"]:g} |'
    )
  lines += [
    '',
    'Memory `prepare_weights` adds to the params: '
    f'{s["whole_prepared_mb"]} MB with whole kernels, '
    f'{s["sliced_prepared_mb"]} MB sliced.',
    '',
    f'Codebook search of one frame, {q["levels"]} levels, codebooks read '
    'from memory (a 256 MB read before each call, its '
    f'{q["eviction_read_ms"]} ms subtracted): one product per level '
    f'{q["one_product_per_level_ms"]} ms, two 1×1 convs per level '
    f'{q["two_convs_per_level_ms"]} ms; codes equal: {q["codes_equal"]}.',
  ]
  return '\n'.join(
    [*lines, '', report.machine_line(r), '', *report.json_details(r)]
  )


if __name__ == '__main__':
  main()

"""Where a streamed frame's time goes, layer by layer.

    python benchmarks/streaming_profile.py [--preset production]
        [--calls 20] [--whole-frames 16] [--update-docs]

Traces the compiled streaming steps (one 40 ms frame per call, 64-level
codes) and the whole-sequence encode and decode of `--whole-frames` frames
with the JAX profiler, and attributes every XLA:CPU operation to the codec
layer it belongs to (from the compiled HLO's metadata, or for the products
that carry none, from the weights they read). For each layer it prints the
operation time per frame in both paths, their ratio, the weights a streamed
frame reads there and the rate at which it reads them; for the quantiser,
the time of one level's codebook product. Operation time counts an
operation once, on the thread that ran it, so its sum can exceed the wall
time when XLA runs operations side by side (docs/streaming.md, "Where the
time goes"). Prints JSON; `--update-docs` writes its section of
docs/benchmarks.md.
"""

import argparse
import collections
import json
import os
import pathlib
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report

NETWORKS = ('Encoder', 'Decoder', 'encoder', 'decoder')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*$', re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r'%([\w.\-]+)')
_CONTROL_FLOW = re.compile(r' (?:while|call|conditional)\(%')
_WEIGHT_PATH = re.compile(r"\[\\?'(encoder|decoder)\\?'\]\[\\?'([^'\\]+)")


def _layer_of_path(op_name: str) -> str | None:
  """The codec layer an op_name or a weight's path names, if any."""
  parts = op_name.split('/')
  for i, part in enumerate(parts[:-1]):
    if part in NETWORKS:
      # The next component is a layer unless it is the primitive itself.
      return parts[i + 1] if i + 2 < len(parts) else f'{part.lower()} glue'
  if any(
    p.startswith(('quantizer', 'SpectroStream.quantize', 'vmap(jit(_take))'))
    or p == 'SpectroStream.dequantize'
    for p in parts
  ) or re.search('codebook|code_norms', op_name):
    return 'quantizer'
  weight = _WEIGHT_PATH.search(op_name)
  if weight:
    return weight.group(2)
  if any(p in ('SpectroStream.features', 'jit(fft)') for p in parts):
    return 'STFT / iSTFT'
  return None


def layer_table(hlo: str) -> dict[str, str]:
  """HLO instruction name -> codec layer.

  Instructions without a telling op_name (products whose metadata XLA
  dropped, argmin fusions) take the layer of the nearest operand that has
  one, within three steps: the quantiser's products read `codebook`
  buffers, the input layer's read `['decoder']['input_layer']` weights.
  """
  lines = {m.group(1): m.group(0) for m in _INSTRUCTION.finditer(hlo)}
  direct = {}
  for name, line in lines.items():
    m = _OP_NAME.search(line)
    direct[name] = _layer_of_path(m.group(1)) if m else None

  def resolve(name: str, depth: int) -> str | None:
    if direct.get(name) or depth == 0:
      return direct.get(name)
    body = lines[name].split('=', 1)[1].split('metadata=')[0]
    for operand in _OPERAND.findall(body):
      if operand in lines and operand != name:
        found = resolve(operand, depth - 1)
        if found:
          return found
    return None

  # A loop's own event spans its body's events, which count already.
  return {
    name: resolve(name, 3) or 'other'
    for name, line in lines.items()
    if not _CONTROL_FLOW.search(line)
  }


def trace(fn, calls: int) -> list:
  """Runs `fn` `calls` times under the profiler; its XLA op events."""
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(calls):
      fn()
    jax.profiler.stop_trace()
    (path,) = pathlib.Path(tmp).rglob('*.xplane.pb')
    data = jax.profiler.ProfileData.from_file(str(path))
  return [
    (event.name, event.duration_ns)
    for plane in data.planes
    for line in plane.lines
    for event in line.events
  ]


def per_layer(events, table: dict[str, str], frames: int) -> dict:
  """Milliseconds of op time per frame for each layer."""
  total = collections.Counter()
  for name, ns in events:
    if name in table:
      total[table[name]] += ns
  return {k: v / frames / 1e6 for k, v in total.items()}


def _wall(fn, calls: int) -> float:
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(1000 * (time.perf_counter() - start))
  return float(np.median(times))


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _weights_mb(weights: dict, net: str) -> dict[str, float]:
  """MB a streamed frame reads per layer.

  A conv whose kernel `prepare_weights` re-laid out (phase kernels, output
  slices) reads those instead of its own `conv/kernel`.
  """
  out = collections.Counter()
  replaced = set()

  def walk_prepared(tree, path):
    for key, value in tree.items():
      if key in ('kernel_slices', 'phase_kernels'):
        replaced.add(path)
        out[path[0]] += _nbytes(value) / 1e6
      else:
        walk_prepared(value, (*path, key))

  walk_prepared(weights[f'prepared_{net}'], ())
  for path, leaf in jax.tree_util.tree_leaves_with_path(weights[net]):
    keys = tuple(k.key for k in path)
    if keys[-2:] == ('conv', 'kernel') and keys[:-2] in replaced:
      continue
    out[keys[0]] += leaf.size * leaf.dtype.itemsize / 1e6
  return dict(out)


class _Stepper:
  """Calls a donated streaming step in a loop, threading its state."""

  def __init__(self, step, cfg, weights, state, x, *extra):
    self.args = (cfg, weights)
    self.step, self.state, self.x, self.extra = step, state, x, extra

  def __call__(self):
    self.state, *out = self.step(*self.args, self.state, self.x, *self.extra)
    jax.block_until_ready(out)


def profile_direction(name, codec, levels, calls, whole_frames) -> dict:
  cfg, weights = codec.config, codec.streaming_weights
  spf = cfg.samples_per_frame
  rng = np.random.default_rng(0)
  if name == 'encode':
    window = jnp.asarray(
      rng.uniform(-0.5, 0.5, (1, spf + cfg.hop_length, cfg.num_channels)),
      jnp.float32,
    )
    state = streaming.init_encoder_state(cfg, weights)
    step = _Stepper(streaming.encode_step, cfg, weights, state, window, levels)
    hlo = streaming.encode_step.lower(cfg, weights, state, window, levels)
    wav = rng.uniform(-0.5, 0.5, (1, whole_frames * spf, cfg.num_channels))
    whole_args = (codec.params, jnp.asarray(wav, jnp.float32), levels)
    whole_fn = codec._encode  # noqa: SLF001 (the jitted whole path)
    mb = _weights_mb(weights, 'encoder')
    mb['quantizer'] = (
      _nbytes(weights['search_kernels'][:levels])
      + _nbytes(weights['code_norms'][:levels])
    ) / 1e6
  else:
    codes = jnp.asarray(
      rng.integers(0, cfg.quantizer.codebook_size, (1, 1, levels)), jnp.int32
    )
    state = streaming.init_decoder_state(cfg, weights)
    step = _Stepper(streaming.decode_step, cfg, weights, state, codes)
    hlo = streaming.decode_step.lower(cfg, weights, state, codes)
    whole_args = (
      codec.params,
      jnp.asarray(
        rng.integers(0, cfg.quantizer.codebook_size, (1, whole_frames, levels)),
        jnp.int32,
      ),
    )
    whole_fn = codec._decode  # noqa: SLF001
    mb = _weights_mb(weights, 'decoder')
  table = layer_table(hlo.compile().as_text())
  whole_table = layer_table(whole_fn.lower(*whole_args).compile().as_text())

  def whole():
    jax.block_until_ready(whole_fn(*whole_args))

  for _ in range(3):
    step()
    whole()
  events = trace(step, calls)
  streamed = per_layer(events, table, calls)
  whole_ms = per_layer(
    trace(whole, max(2, calls // 4)), whole_table, max(2, calls // 4)
  )
  whole_ms = {k: v / whole_frames for k, v in whole_ms.items()}
  level_products = [
    ns / 1e3
    for n, ns in events
    if table.get(n) == 'quantizer'
    and n.startswith(('dot', 'ynn_fusion', 'convolution'))
  ]
  layers = {}
  for layer in sorted(set(streamed) | set(whole_ms)):
    s, w = streamed.get(layer, 0.0), whole_ms.get(layer, 0.0)
    row = {'streamed_ms': round(s, 3), 'whole_ms': round(w, 3)}
    row['ratio'] = round(s / w, 2) if w > 0.01 else None
    if mb.get(layer):
      row['weights_mb'] = round(mb[layer], 1)
      row['read_gb_per_s'] = round(mb[layer] / s, 1) if s else None
    layers[layer] = row
  out = {
    'step_wall_ms': round(_wall(step, calls), 2),
    'whole_wall_ms_per_frame': round(
      _wall(whole, max(2, calls // 4)) / whole_frames, 2
    ),
    'streamed_op_ms': round(sum(streamed.values()), 2),
    'whole_op_ms_per_frame': round(sum(whole_ms.values()), 2),
    'layers': dict(
      sorted(layers.items(), key=lambda kv: -kv[1]['streamed_ms'])
    ),
  }
  if name == 'encode' and level_products:
    part = float(np.median(level_products))
    out['quantizer_product_parts_per_level'] = len(weights['search_kernels'][0])
    out['quantizer_product_part_us'] = round(part, 1)
    out['quantizer_product_part_gb_per_s'] = round(
      _nbytes(weights['search_kernels'][0][0]) / part / 1e3, 1
    )
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='production')
  ap.add_argument('--calls', type=int, default=20)
  ap.add_argument('--whole-frames', type=int, default=16)
  ap.add_argument('--levels', type=int, default=None)
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()
  cfg = codec_lib.get_config(args.preset)
  levels = args.levels or cfg.quantizer.num_levels
  codec = Codec.random(cfg)
  result = {
    'benchmark': 'streaming_profile',
    'preset': args.preset,
    'levels': levels,
    'calls': args.calls,
    'whole_frames': args.whole_frames,
    **report.environment(),
    'load_before': [round(x, 2) for x in os.getloadavg()],
  }
  for name in ('encode', 'decode'):
    result[name] = profile_direction(
      name, codec, levels, args.calls, args.whole_frames
    )
  result['load_after'] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('streaming_profile', result, markdown)


def markdown(r: dict) -> str:
  lines = [
    '## Streaming profile: where a streamed frame goes',
    '',
    'Operation time per frame of each layer, one 40 ms frame per call '
    f'against the whole-sequence path on {r["whole_frames"]} frames, '
    f'{r["levels"]}-level codes, {r["preset"]} model; from the JAX '
    'profiler, each XLA operation counted once on the thread that ran it '
    '(docs/streaming.md, "Where the time goes"). Load average '
    f'{", ".join(f"{x:g}" for x in r["load_before"])} before.',
  ]
  for name in ('encode', 'decode'):
    d = r[name]
    lines += [
      '',
      f'**{name.capitalize()}**: step {d["step_wall_ms"]} ms wall '
      f'({d["streamed_op_ms"]} ms of operations); whole sequence '
      f'{d["whole_wall_ms_per_frame"]} ms wall per frame '
      f'({d["whole_op_ms_per_frame"]} ms of operations).',
    ]
    if 'quantizer_product_part_us' in d:
      lines[-1] += (
        " A quantiser level's codebook product, in "
        f'{d["quantizer_product_parts_per_level"]} parts that run side by '
        f'side: {d["quantizer_product_part_us"]} µs a part '
        f'({d["quantizer_product_part_gb_per_s"]} GB/s).'
      )
    lines += [
      '',
      '| layer | streamed ms | whole ms | ratio | weights MB | read GB/s |',
      '|---|---|---|---|---|---|',
    ]
    for layer, row in d['layers'].items():
      if row['streamed_ms'] < 0.05 and row['whole_ms'] < 0.05:
        continue
      lines.append(
        f'| {layer} | {row["streamed_ms"]} | {row["whole_ms"]} | '
        f'{row["ratio"] or "–"} | {row.get("weights_mb", "–")} | '
        f'{row.get("read_gb_per_s") or "–"} |'
      )
  return '\n'.join(
    [*lines, '', report.machine_line(r), '', *report.json_details(r)]
  )


if __name__ == '__main__':
  main()

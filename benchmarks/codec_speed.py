"""Whole-sequence encode / decode speed of a codec preset on this machine.

    python benchmarks/codec_speed.py [--preset production] [--seconds 10]

Prints one JSON object: wall time, real-time factor and achieved GFLOP/s of
encode (waveform -> 64-level codes), decode (codes -> waveform) and the round
trip, next to this machine's own float32 matmul rate measured in the same
run and, on an accelerator in `flops.PEAKS`, the MFU. FLOPs are the matrix
products and convolutions of each function (`spectrostream_jax.flops`). With
`--official-python PY` it also times Google's implementation on the same job
(benchmarks/official_codec_speed.py, run by PY, a Python that has the
magenta-rt package), alternating calls of the two implementations. With
`--update-docs` the figures are written into docs/benchmarks.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import flops as flops_lib
from spectrostream_jax.models import codec as codec_lib

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report


def matmul_rate(n: int = 2048, repeats: int = 10) -> float:
  """Best float32 GFLOP/s of an n×n×n matmul through XLA."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(f, a) for _ in range(repeats))
  return 2 * n**3 / best / 1e9


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def measure(fn, args, repeats: int) -> dict:
  """Compile time, best and median wall time, FLOPs and MFU of fn(*args).

  The MFU is against the float32 peak: the codec computes in float32.
  """
  traced = jax.jit(fn).trace(*args)
  flops = flops_lib.of_jaxpr(traced.jaxpr)
  lowered = traced.lower()
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  compiled(*args)  # Warm-up.
  times = [_timed(compiled, *args) for _ in range(repeats)]
  best = min(times)
  mfu = flops_lib.mfu(flops, best, 'float32', devices=1)
  return {
    'seconds': round(best, 4),
    'median_seconds': round(float(np.median(times)), 4),
    'compile_seconds': round(compile_s, 2),
    'gflop': round(flops / 1e9, 1),
    'gflop_per_s': round(flops / best / 1e9, 1),
    'mfu': None if mfu is None else round(mfu, 4),
  }


def official(args) -> dict:
  """Runs benchmarks/official_codec_speed.py under another Python."""
  script = os.path.join(os.path.dirname(__file__), 'official_codec_speed.py')
  cmd = [args.official_python, script, '--seconds', str(args.seconds)]
  cmd += ['--repeats', str(args.repeats)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(f'official benchmark failed: {out.stderr.strip()[-500:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(preset: str, seconds: float, levels: int | None, repeats: int) -> dict:
  """Encode, decode and round trip of `seconds` of random stereo audio."""
  cfg = codec_lib.get_config(preset)
  levels = levels or cfg.quantizer.num_levels
  params = codec_lib.init_params(cfg, jax.random.key(0))
  model = codec_lib.SpectroStream(cfg)
  samples = int(seconds * cfg.sample_rate)
  wav = jnp.asarray(
    np.random.default_rng(0).uniform(-0.5, 0.5, (1, samples, 2)), jnp.float32
  )

  def encode(p, x):
    return model.apply({'params': p}, x, levels, method=model.encode)

  def decode(p, c):
    return model.apply({'params': p}, c, method=model.decode)

  def round_trip(p, x):
    return decode(p, encode(p, x))

  codes = jax.jit(encode)(params, wav)
  result = {
    'benchmark': 'codec_speed',
    'preset': preset,
    'audio_seconds': seconds,
    'levels': levels,
    **report.environment(),
    'matmul_gflop_per_s': round(matmul_rate(), 1),
  }
  for name, fn, x in (
    ('encode', encode, wav),
    ('decode', decode, codes),
    ('round_trip', round_trip, wav),
  ):
    m = measure(fn, (params, x), repeats)
    m['rtf'] = round(m['seconds'] / seconds, 4)
    m['x_realtime'] = round(seconds / m['seconds'], 2)
    m['fraction_of_matmul_rate'] = round(
      m['gflop_per_s'] / result['matmul_gflop_per_s'], 3
    )
    result[name] = m
  return result


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='production')
  ap.add_argument('--seconds', type=float, default=10.0)
  ap.add_argument('--levels', type=int, default=None)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--official-python', default=None)
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()

  result = run(args.preset, args.seconds, args.levels, args.repeats)
  if args.official_python:
    result['official'] = official(args)
    for name in ('encode', 'decode'):
      result[name]['speedup_vs_official'] = round(
        result['official']['official'][name]['seconds']
        / result['official']['ours'][name]['seconds'],
        2,
      )
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('codec_speed', result, report.codec_speed_markdown)


if __name__ == '__main__':
  main()

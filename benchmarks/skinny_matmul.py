"""Why one streamed frame costs more than its share of the whole sequence.

    python benchmarks/skinny_matmul.py [--update-docs]

A streamed frame gives the embedding-rate layers only 5-10 rows, the whole
sequence hundreds. This times the decoder_0 product (a 3×3 conv of 1024
channels as `[M, 9216] × [9216, 1024]`, f32) for several row counts M,
calls interleaved so that all see the same load, and prints the median
time, GFLOP/s and the rate at which the 37.7 MB kernel is read
(docs/streaming.md, "Performance"). Prints JSON; `--update-docs` writes
its section of docs/benchmarks.md.
"""

import argparse
import json
import os
import time

import jax
import numpy as np

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report

K, N = 9 * 1024, 1024
ROWS = (1, 2, 5, 10, 40, 160)
CALLS = 30


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  kernel = jax.device_put(rng.standard_normal((K, N), np.float32))
  inputs = {
    m: jax.device_put(rng.standard_normal((m, K), np.float32)) for m in ROWS
  }
  product = jax.jit(lambda x, w: x @ w)
  for x in inputs.values():
    product(x, kernel).block_until_ready()
  times = {m: [] for m in ROWS}
  load_before = os.getloadavg()
  for _ in range(CALLS):
    for m, x in inputs.items():
      start = time.perf_counter()
      product(x, kernel).block_until_ready()
      times[m].append(time.perf_counter() - start)
  rows = {}
  for m in ROWS:
    seconds = float(np.median(times[m]))
    rows[str(m)] = {
      'median_ms': round(1e3 * seconds, 3),
      'gflop_per_s': round(2 * m * K * N / seconds / 1e9, 1),
      'kernel_gb_per_s': round(4 * K * N / seconds / 1e9, 1),
    }
  result = {
    'benchmark': 'skinny_matmul',
    'shape': f'[M, {K}] x [{K}, {N}] f32',
    'calls': CALLS,
    **report.environment(),
    'load_before': [round(x, 2) for x in load_before],
    'load_after': [round(x, 2) for x in os.getloadavg()],
    'rows': rows,
  }
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('skinny_matmul', result, markdown)


def markdown(r: dict) -> str:
  lines = [
    '## Products with few rows (why a streamed frame costs more)',
    '',
    f"decoder_0's 3×3 conv of 1024 channels as a {r['shape']} product, "
    f'median of {r["calls"]} interleaved calls per row count M; a streamed '
    'frame gives such layers M = 5-10, the whole sequence hundreds '
    '(docs/streaming.md, "Performance"). Load average '
    f'{", ".join(f"{x:g}" for x in r["load_before"])} before.',
    '',
    '| M | median | GFLOP/s | kernel read |',
    '|---|---|---|---|',
  ]
  for m, row in r['rows'].items():
    lines.append(
      f'| {m} | {row["median_ms"]} ms | {row["gflop_per_s"]} '
      f'| {row["kernel_gb_per_s"]} GB/s |'
    )
  return '\n'.join(
    [*lines, '', report.machine_line(r), '', *report.json_details(r)]
  )


if __name__ == '__main__':
  main()

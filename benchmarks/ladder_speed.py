r"""Wall time and XLA compiles of the two ladders, and agreement with another
checkout's.

    git worktree add /tmp/before a738e28
    python benchmarks/ladder_speed.py --model MODEL_DIR \
        --debian /tmp/debian_music/manifest.jsonl \
        --lossless /tmp/lossless_music/manifest.jsonl \
        [--before /tmp/before] [--update-docs]

Runs `spectrostream-eval` as docs/results.md does (bitrates 1-16 kbps,
Opus, AAC, MP3, ViSQOL, one worker) on the Debian eval split's 30 s clips
and on the lossless corpus, with the compilation cache off, from this
checkout and, with --before, from that one (its package first on
PYTHONPATH). Counts the XLA compiles from JAX's compile log and their
seconds, and gives the largest difference of any per-clip metric between
the two checkouts' results. Prints one JSON object; --update-docs writes
it into docs/benchmarks.md (docs/evaluation.md, "Few compiles").
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report

_COMPILED = re.compile(r'Finished XLA compilation of .* in ([\d.e-]+) sec')
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ladder(tree: str, model: str, data: str, seconds: float | None, out: str):
  """One ladder run from checkout `tree`: wall time and compiles."""
  code = 'from spectrostream_jax import console; console.spectrostream_eval()'
  model, data, out = (os.path.abspath(p) for p in (model, data, out))
  argv = [sys.executable, '-c', code, '--model', model, '--data', data]
  argv += ['--kbps', '1,2,4,8,16', '--workers', '1', '--compile-cache', 'off']
  argv += ['--out', out, '--quiet']
  if seconds:
    argv += ['--clip-seconds', str(seconds)]
  env = dict(os.environ, JAX_LOG_COMPILES='1')
  env['PYTHONPATH'] = os.pathsep.join([tree, env.get('PYTHONPATH', '')])
  start = time.perf_counter()
  # From the tree itself: `python -c` puts the working directory first.
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tree)
  wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f'ladder_speed: {tree}: {proc.stderr.strip().splitlines()[-1]}')
  compiles = [float(s) for s in _COMPILED.findall(proc.stderr)]
  return {
    'wall_seconds': round(wall, 1),
    'compiles': len(compiles),
    'compile_seconds': round(sum(compiles), 1),
  }


def _results(out: str) -> dict:
  with open(os.path.join(out, 'results.json')) as f:
    return json.load(f)


def differences(a: str, b: str) -> dict[str, float]:
  """Largest |a − b| of each metric over every system, rate and clip."""
  rows = [_results(d)['rows'] for d in (a, b)]
  worst: dict[str, float] = {}
  for row_a, row_b in zip(*rows, strict=True):
    for clip_a, clip_b in zip(row_a['clips'], row_b['clips'], strict=True):
      for name, value in clip_a.items():
        other = clip_b.get(name)
        if not isinstance(value, float) or not isinstance(other, float):
          continue
        if math.isnan(value) and math.isnan(other):
          continue
        worst[name] = max(worst.get(name, 0.0), abs(value - other))
  return {k: float(f'{v:.3g}') for k, v in sorted(worst.items())}


def markdown(r: dict) -> str:
  lines = [
    '## Ladder',
    '',
    report.machine_line(r['environment']),
    '',
    f'Model: {r["model"]}. Both ladders as in docs/results.md (1, 2, 4, 8, '
    '16 kbps; Opus, AAC, MP3; ViSQOL; one worker), compilation cache off. '
    '"before" is the checkout that compiled the codec for each clip length '
    'and bitrate; "after" pads clips to length buckets '
    '([evaluation.md](evaluation.md), "Few compiles").',
    '',
    '| ladder | clips | checkout | wall | XLA compiles | compile time |',
    '|---|---|---|---|---|---|',
  ]
  for name, case in r['ladders'].items():
    for tree in ('before', 'after'):
      if tree in case:
        t = case[tree]
        lines.append(
          f'| {name} | {case["clips"]} | {tree} | '
          f'{t["wall_seconds"] / 60:.1f} min | {t["compiles"]} | '
          f'{t["compile_seconds"]:.0f} s |'
        )
  lines.append('')
  for name, case in r['ladders'].items():
    if 'largest_difference' in case:
      diff = ', '.join(
        f'{k} {v:g}' for k, v in case['largest_difference'].items()
      )
      lines.append(f'- {name}, largest per-clip difference: {diff}.')
  lines += ['', *report.json_details(r)]
  return '\n'.join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', required=True)
  ap.add_argument('--debian', required=True, help='Debian corpus manifest')
  ap.add_argument('--lossless', required=True, help='lossless manifest')
  ap.add_argument('--before', help='another checkout to compare with')
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()
  trees = {'after': HERE}
  if args.before:
    trees = {'before': os.path.abspath(args.before), **trees}
  result = {
    'environment': report.environment(),
    'model': os.path.basename(os.path.normpath(args.model)),
    'ladders': {},
  }
  with tempfile.TemporaryDirectory() as tmp:
    for name, data, seconds in (
      ('debian eval, 30 s', args.debian, 30.0),
      ('lossless', args.lossless, None),
    ):
      case = {}
      for tree_name, tree in trees.items():
        out = os.path.join(tmp, f'{len(result["ladders"])}_{tree_name}')
        case[tree_name] = ladder(tree, args.model, data, seconds, out)
        print(name, tree_name, case[tree_name], file=sys.stderr, flush=True)
      last = _results(out)
      case['clips'] = len(last['rows'][0]['clips'])
      if args.before:
        case['largest_difference'] = differences(
          os.path.join(tmp, f'{len(result["ladders"])}_before'), out
        )
      result['ladders'][name] = case
  print(json.dumps(result))
  if args.update_docs:
    report.update_section('ladder', result, markdown)


if __name__ == '__main__':
  main()

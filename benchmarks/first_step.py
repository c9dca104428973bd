"""Time to the first training step, with the compilation cache cold and warm.

    python benchmarks/first_step.py [--gin_file experiments/quickstart.gin] \
        [--update-docs]

Runs `spectrostream-train` three times on one workdir: a fresh run with an
empty cache (cold start), a resume from its checkpoint with the cache the
first run filled (warm resume), and the same resume with another empty
cache (cold resume, what every resume paid before the cache). Each time
is the wall time from starting the command to its first step's progress
line; the trainer's own per-program compile seconds come from its log.
Prints one JSON object; `--update-docs` writes it into docs/benchmarks.md
(docs/training.md, "On GPUs and TPUs").
"""

import argparse
import json
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

_STEP = re.compile(r'\] step (\d+)/\d+ \|')
_COMPILED = re.compile(r'\] compiled (\w+) in ([\d.]+) s')
_ALL = re.compile(r'\] (\d+) programs compiled in ([\d.]+) s')


def run(workdir: str, cache: str, gin_file: str, steps: int) -> dict:
  """Trains to `steps`; the seconds to the first step and what compiled."""
  code = 'from spectrostream_jax import console; console.spectrostream_train()'
  argv = [
    sys.executable,
    '-c',
    code,
    f'--workdir={workdir}',
    f'--gin_file={gin_file}',
    f'--gin.train.num_steps={steps}',
    '--gin.train.eval_every=0',
    f'--compile_cache={cache}',
  ]
  start = time.perf_counter()
  proc = subprocess.Popen(
    argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
  )
  first, compiled, total, log = None, {}, None, []
  for line in proc.stderr:
    log.append(line)
    if first is None and _STEP.search(line):
      first = time.perf_counter() - start
    if m := _COMPILED.search(line):
      compiled[m[1]] = float(m[2])
    if m := _ALL.search(line):
      total = float(m[2])
  if proc.wait() or first is None:
    sys.exit(f'first_step: the run failed:\n{"".join(log[-20:])}')
  return {
    'seconds_to_first_step': round(first, 1),
    'compile_wall_seconds': total,
    'compile_seconds': compiled,
  }


def measure(gin_file: str) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, 'run')
    warm, other = os.path.join(tmp, 'cache'), os.path.join(tmp, 'cold')
    return {
      'cold_start': run(workdir, warm, gin_file, 1),
      'warm_resume': run(workdir, warm, gin_file, 2),
      'cold_resume': run(workdir, other, gin_file, 3),
    }


def markdown(r: dict) -> str:
  lines = [
    '## Time to the first step, compilation cache cold and warm',
    '',
    report.machine_line(r),
    '',
    'Wall time from starting `spectrostream-train` to its first step, and '
    "the trainer's compile seconds (its programs compile in parallel "
    'threads, so the wall time is less than their sum).',
    '',
    '| run | cache | first step (s) | compile wall (s) | per program (s) |',
    '| --- | --- | --- | --- | --- |',
  ]
  for name, cache in (
    ('cold_start', 'empty'),
    ('cold_resume', 'empty'),
    ('warm_resume', 'filled by the first run'),
  ):
    x = r[name]
    per = ', '.join(f'{k} {v:g}' for k, v in x['compile_seconds'].items())
    lines.append(
      f'| {name.replace("_", " ")} | {cache} | '
      f'{x["seconds_to_first_step"]} | {x["compile_wall_seconds"]} | '
      f'{per} |'
    )
  return '\n'.join([*lines, '', *report.json_details(r)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gin_file', default='experiments/quickstart.gin')
  parser.add_argument('--update-docs', action='store_true')
  args = parser.parse_args()
  result = {
    'gin_file': args.gin_file,
    **measure(args.gin_file),
    **report.environment(),
  }
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('first_step', result, markdown)


if __name__ == '__main__':
  main()

r"""Expands a sweep file into training runs, one workdir each, and starts them.

    python launch/sweep.py launch/sweeps/ablations.json /runs/ablations \
        [--launcher print|local|slurm] [-- extra spectrostream-train flags]

A sweep file is JSON:

    {"gin_files": ["experiments/production_debian.gin", ...],
     "bindings": {"train.num_steps": 200000},      # every run
     "defaults": {"codec.CodecConfig.lookahead": 1, ...},
     "grids": [{"codec.CodecConfig.fusion_block": [5, 6, 7]},
               {"codec.CodecConfig.lookahead": [0, 1, 2, 3]}]}

Each grid is a full product of its values; a run's bindings are the
defaults overridden by one grid point, and runs whose bindings coincide
(the baseline shared by two one-factor grids) run once. A run is named
after the values of the swept keys (`fusion_block5_lookahead1`) and trains
in ROOT/NAME. Recipes that change several keys at once are named arms
instead of grids, each the defaults overridden by its own bindings:

    "arms": {"today": {}, "balancer": {"losses.LossConfig.balancer": true,
                                       "losses.LossConfig.wav_weight": 2.5}}

A JSON list is bound as a tuple (gin configs are frozen dataclasses).
`print` (default) only prints the commands; `local` runs them here,
`--jobs` at a time, each logging to ROOT/NAME.log; `slurm` submits each
with launch/slurm_gpu.sbatch.
"""

import argparse
import concurrent.futures
import itertools
import json
import pathlib
import shlex
import subprocess
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent


def expand(sweep: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """[(run name, {selector: value})] in file order, without duplicates."""
  defaults = sweep.get('defaults', {})
  if 'arms' in sweep:
    if 'grids' in sweep:
      raise ValueError('a sweep has grids or arms, not both')
    return [(name, {**defaults, **b}) for name, b in sweep['arms'].items()]
  swept = [key for grid in sweep['grids'] for key in grid]
  names = list(dict.fromkeys(swept))
  runs, seen = [], set()
  for grid in sweep['grids']:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
      bindings = {**defaults, **dict(zip(keys, values, strict=True))}
      missing = [k for k in names if k not in bindings]
      if missing:
        raise ValueError(f'no default for {missing} (needed by other grids)')
      key = tuple(sorted((k, repr(v)) for k, v in bindings.items()))
      if key in seen:
        continue
      seen.add(key)
      name = '_'.join(f'{k.rsplit(".", 1)[-1]}{bindings[k]}' for k in names)
      runs.append((name, bindings))
  return runs


def train_flags(sweep: dict[str, Any], bindings: dict[str, Any]) -> list[str]:
  """spectrostream-train flags of one run (gin values as Python literals)."""
  flags = [f'--gin_file={f}' for f in sweep['gin_files']]
  for selector, value in {**sweep.get('bindings', {}), **bindings}.items():
    flags.append(f'--gin_bindings={selector} = {_literal(value)}')
  return flags


def _literal(value: Any) -> str:
  if isinstance(value, list):
    return repr(tuple(value))
  return repr(value)


def command(launcher: str, workdir: pathlib.Path, flags: list[str]):
  if launcher == 'slurm':
    return [
      'sbatch',
      f'--job-name={workdir.name}',
      str(HERE / 'slurm_gpu.sbatch'),
      str(workdir),
      *flags,
    ]
  return ['spectrostream-train', f'--workdir={workdir}', *flags]


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('sweep', type=pathlib.Path)
  parser.add_argument('root', type=pathlib.Path)
  parser.add_argument(
    '--launcher', choices=('print', 'local', 'slurm'), default='print'
  )
  parser.add_argument(
    '--jobs', type=int, default=1, help='runs at once (--launcher=local)'
  )
  parser.add_argument(
    '--only', default='', help='comma-separated run names (default: all)'
  )
  parser.add_argument('extra', nargs='*', help='flags for every run')
  args = parser.parse_args(argv)
  try:
    sweep = json.loads(args.sweep.read_text())
    runs = expand(sweep)
  except (OSError, ValueError, KeyError) as e:
    parser.error(f'{args.sweep}: {e}')
  if args.only:
    wanted = args.only.split(',')
    unknown = sorted(set(wanted) - {name for name, _ in runs})
    if unknown:
      parser.error(f'no run named {", ".join(unknown)} in {args.sweep}')
    runs = [(name, b) for name, b in runs if name in wanted]
  cmds = []
  for name, bindings in runs:
    flags = train_flags(sweep, bindings) + args.extra
    cmds.append(command(args.launcher, args.root / name, flags))
    print(shlex.join(cmds[-1]), flush=True)
  if args.launcher == 'print':
    return
  # Each run logs to ROOT/NAME.log; a failed run does not stop the rest.
  args.root.mkdir(parents=True, exist_ok=True)

  def run(name_cmd):
    name, cmd = name_cmd
    with open(args.root / f'{name}.log', 'a') as log:
      return subprocess.run(
        cmd, cwd=HERE.parent, stdout=log, stderr=subprocess.STDOUT
      ).returncode

  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    codes = list(pool.map(run, zip([n for n, _ in runs], cmds, strict=True)))
  failed = [name for (name, _), rc in zip(runs, codes, strict=True) if rc]
  if failed:
    sys.exit(f'sweep.py: runs failed: {", ".join(failed)}')


if __name__ == '__main__':
  main(sys.argv[1:])

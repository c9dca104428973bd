r"""Compares the runs of a sweep: a table of held-out scores and a PNG.

    python launch/sweep_report.py launch/sweeps/third_step.json \
        /work/runs/third_sweep --data /tmp/debian_music/manifest.jsonl \
        --out docs/results/third_sweep [--evaluate]

For each run of the sweep file (launch/sweep.py) in ROOT/NAME:
`--evaluate` exports its last checkpoint to ROOT/NAME/model and runs the
ladder on the eval split of --data (codec only, no ViSQOL, --kbps) into
ROOT/NAME/ladder, unless that ladder exists and is newer than the
checkpoint. Then OUT gets `table.md` (steps, time in steps, steps/s,
SI-SDR per bitrate, mel distance, LSD, level-1 perplexity), `summary.json`
(the same numbers) and `curves.png` (the in-loop metrics against steps,
one line per run). A run without a ladder gets its in-loop figures only.
docs/results.md explains the columns.

Each run's numbers and plotted curves are also kept in OUT/runs/NAME.json
(a few kB, no audio). A run that is not under ROOT is taken from there,
so a sweep longer than one machine's lifetime is reported whole: commit
OUT after each run, train the rest elsewhere, report again.
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sweep as sweep_lib  # noqa: E402

from spectrostream_jax.training import curves  # noqa: E402

TAGS = (
  'eval/si_sdr/1kbps',
  'eval/si_sdr/4kbps',
  'eval/si_sdr/16kbps',
  'eval/mel_distance/4kbps',
  'eval/perplexity/L00',
  'g/wav',
  'g/share/wav',
  'g/share/phase',
  'g/share/feat',
  'g/mel',
  'd/loss',
  'g/adv',
)
# Kept in OUT/runs/NAME.json besides TAGS: what `training_seconds` needs.
KEPT = (*TAGS, 'perf/steps_per_second')


def _newest_checkpoint(workdir: pathlib.Path) -> float:
  stamps = [p.stat().st_mtime for p in workdir.glob('checkpoints/*')]
  return max(stamps, default=0.0)


def evaluate(workdir: pathlib.Path, data: str, kbps: str, seconds: float):
  """Export and ladder of one run, unless its ladder is up to date."""
  ladder = workdir / 'ladder'
  results = ladder / 'results.json'
  if results.exists() and results.stat().st_mtime > _newest_checkpoint(workdir):
    return
  model = workdir / 'model'
  for cmd in (
    [
      'spectrostream-export',
      f'--workdir={workdir}',
      f'--out={model}',
      '--overwrite',
    ],
    [
      'spectrostream-eval',
      '--model',
      str(model),
      '--data',
      data,
      '--kbps',
      kbps,
      '--clip-seconds',
      str(seconds),
      '--baselines',
      'none',
      '--no-visqol',
      '--workers',
      '0',
      '--quiet',
      '--out',
      str(ladder),
    ],
  ):
    print(' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def summarise(workdir: pathlib.Path) -> dict:
  """The run's numbers: from its TensorBoard events and its ladder."""
  scalars = curves.read_scalars(str(workdir / 'tensorboard'))
  out = {'scalars': scalars}
  if 'perf/steps_per_second' in scalars:
    seconds = curves.training_seconds(scalars)
    steps = int(scalars['perf/steps_per_second'][0][-1])
    out.update(steps=steps, seconds=seconds, steps_per_second=steps / seconds)
  results = workdir / 'ladder' / 'results.json'
  if results.exists():
    ladder = json.loads(results.read_text())
    out['perplexity_l1'] = ladder['codebooks']['perplexity'][0]
    for row in ladder['rows']:
      k = f'{row["kbps_requested"]:g}'
      for name in ('si_sdr', 'mel_distance', 'lsd'):
        out[f'{name}/{k}'] = row['mean'][name]
  return out


def keep(summary: dict) -> dict:
  """The summary with only the scalars that the report plots or needs."""
  scalars = {t: v for t, v in summary['scalars'].items() if t in KEPT}
  return {**summary, 'scalars': scalars}


def _dumps(summary: dict) -> str:
  scalars = {
    t: [np.asarray(s).tolist(), np.asarray(v).tolist()]
    for t, (s, v) in summary['scalars'].items()
  }
  return json.dumps({**summary, 'scalars': scalars}, indent=1) + '\n'


def _loads(text: str) -> dict:
  summary = json.loads(text)
  summary['scalars'] = {
    t: (np.array(s), np.array(v)) for t, (s, v) in summary['scalars'].items()
  }
  return summary


def _fmt(value, digits: int = 2) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return '–'
  return f'{value:.{digits}f}'


def table(summaries: dict[str, dict], kbps: list[str]) -> str:
  head = ['run', 'steps', 'time in steps', 'steps/s']
  head += [f'SI-SDR {k} kbps (dB)' for k in kbps]
  head += [f'mel distance {k} kbps' for k in kbps]
  head += [f'LSD {k} kbps (dB)' for k in kbps]
  head += ['level-1 perplexity']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, s in summaries.items():
    seconds = s.get('seconds')
    time = '–' if seconds is None else f'{seconds / 3600:.2f} h'
    cells = [name, str(s.get('steps', '–')), time]
    cells.append(_fmt(s.get('steps_per_second'), 3))
    for metric, digits in (('si_sdr', 2), ('mel_distance', 3), ('lsd', 2)):
      cells += [_fmt(s.get(f'{metric}/{k}'), digits) for k in kbps]
    cells.append(_fmt(s.get('perplexity_l1'), 0))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('sweep', type=pathlib.Path)
  parser.add_argument('root', type=pathlib.Path)
  parser.add_argument('--out', type=pathlib.Path, required=True)
  parser.add_argument('--data', help='manifest of the ladder (--evaluate)')
  parser.add_argument('--evaluate', action='store_true')
  parser.add_argument('--kbps', default='1,4,16')
  parser.add_argument('--clip-seconds', type=float, default=30.0)
  parser.add_argument('--smooth', type=int, default=1)
  args = parser.parse_args(argv)
  if args.evaluate and not args.data:
    parser.error('--evaluate needs --data')
  try:
    runs = sweep_lib.expand(json.loads(args.sweep.read_text()))
  except (OSError, ValueError, KeyError) as e:
    parser.error(f'{args.sweep}: {e}')
  records = args.out / 'runs'
  summaries = {}
  for name, _ in runs:
    workdir = args.root / name
    if (workdir / 'tensorboard').is_dir():
      if args.evaluate:
        evaluate(workdir, args.data, args.kbps, args.clip_seconds)
      summaries[name] = keep(summarise(workdir))
      records.mkdir(parents=True, exist_ok=True)
      (records / f'{name}.json').write_text(_dumps(summaries[name]))
    elif (records / f'{name}.json').exists():
      summaries[name] = _loads((records / f'{name}.json').read_text())
  if not summaries:
    parser.error(
      f'no run of {args.sweep} has trained under {args.root} or {records}'
    )
  args.out.mkdir(parents=True, exist_ok=True)
  kbps = [f'{float(k):g}' for k in args.kbps.split(',')]
  text = table(summaries, kbps)
  (args.out / 'table.md').write_text(text)
  numbers = {
    n: {k: v for k, v in s.items() if k != 'scalars'}
    for n, s in summaries.items()
  }
  (args.out / 'summary.json').write_text(json.dumps(numbers, indent=1))
  curves.compare(
    {n: s['scalars'] for n, s in summaries.items()},
    TAGS,
    os.fspath(args.out / 'curves.png'),
    title=args.sweep.stem,
    smooth=args.smooth,
  )
  print(text, end='')
  print(f'wrote {args.out}/table.md, summary.json, curves.png')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))

"""Writes benchmark figures into docs/benchmarks.md, one marked section each.

Each benchmark owns the text between `<!-- BEGIN name -->` and
`<!-- END name -->`; other sections are left as they are. The file is
rewritten through a temporary file and a rename.
"""

import json
import os
import pathlib
import sys

DOC = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'benchmarks.md'


def update_section(name: str, result: dict, render) -> None:
  begin, end = f'<!-- BEGIN {name} -->', f'<!-- END {name} -->'
  body = f'{begin}\n{render(result).rstrip()}\n{end}'
  text = DOC.read_text() if DOC.exists() else '# Benchmarks\n'
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = head + body + tail
  else:
    text = text.rstrip() + '\n\n' + body + '\n'
  tmp = DOC.with_suffix('.md.tmp')
  tmp.write_text(text)
  os.replace(tmp, DOC)


def command_line() -> str:
  return 'python ' + ' '.join(sys.argv)


def _official_rows(r: dict) -> list[str]:
  if 'official' not in r:
    return []
  o = r['official']
  return [
    '',
    f"Google's implementation ({o['implementation']}, same job, same run): ",
    '',
    '| path | official wall s | ours wall s | ours faster by |',
    '|---|---|---|---|',
    *(
      f'| {n} | {o[n]["seconds"]} | {r[n]["seconds"]} | '
      f'{r[n]["speedup_vs_official"]}× |'
      for n in ('encode', 'decode')
    ),
  ]


def codec_speed_markdown(r: dict) -> str:
  rows = [
    '| path | wall s | RTF | × real time | GFLOP | GFLOP/s | of matmul rate |'
    ' compile s |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for name in ('encode', 'decode', 'round_trip'):
    m = r[name]
    rows.append(
      f'| {name} | {m["seconds"]} | {m["rtf"]} | {m["x_realtime"]} | '
      f'{m["gflop"]} | {m["gflop_per_s"]} | '
      f'{100 * m["fraction_of_matmul_rate"]:.0f} % | {m["compile_seconds"]} |'
    )
  return '\n'.join(
    [
      f'## Codec speed: {r["preset"]}, {r["audio_seconds"]:g} s of 48 kHz '
      f'stereo, {r["levels"]}-level codes',
      '',
      f'Machine: {r["cpu_count"]} × {r["machine"]} ({r["backend"]}, '
      f'{r["device"]}), JAX {r["jax"]}, {r["date"]}. '
      f'Command: `{command_line()}`.',
      '',
      f'float32 matmul rate measured in the same run: '
      f'**{r["matmul_gflop_per_s"]} GFLOP/s**.',
      '',
      *rows,
      *_official_rows(r),
      '',
      'RTF = wall time / audio duration (best of the repeats, after '
      "compilation). FLOPs are XLA's cost analysis of the compiled call.",
      '',
      '<details><summary>JSON</summary>',
      '',
      '```json',
      json.dumps(r, indent=1),
      '```',
      '</details>',
    ]
  )

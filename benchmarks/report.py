"""Writes benchmark figures into docs/benchmarks.md, one marked section each.

Each benchmark owns the text between `<!-- BEGIN name -->` and
`<!-- END name -->`; other sections are left as they are. The file is
rewritten through a temporary file and a rename.
"""

import json
import os
import pathlib
import platform
import sys

from spectrostream_jax import files

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
  files.write_atomic(DOC, text)


def on_fake_devices(script: str, devices: int, case: dict) -> dict:
  """Runs `script --case=JSON` with `devices` fake CPU devices; its JSON.

  A process of its own, since JAX fixes the device count when it starts.
  """
  import subprocess

  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    env.get('XLA_FLAGS', '')
    + f' --xla_force_host_platform_device_count={devices}'
  )
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run(
    [sys.executable, script, f'--case={json.dumps(case)}'],
    env=env,
    cwd=DOC.parents[1],
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo, else what platform knows."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict:
  """Where and when a figure was measured, for every benchmark's JSON."""
  import datetime

  import jax

  return {
    'device': str(jax.devices()[0].device_kind),
    'backend': jax.default_backend(),
    'cpu_count': os.cpu_count(),
    'machine': cpu_name(),
    'jax': jax.__version__,
    'date': datetime.date.today().isoformat(),
  }


def json_details(r: dict) -> list[str]:
  """The raw JSON of a result as a folded Markdown block."""
  return [
    '<details><summary>JSON</summary>',
    '',
    '```json',
    json.dumps(r, indent=1),
    '```',
    '</details>',
  ]


def percent(fraction: float | None) -> str:
  """'12.3 %', or '–' for a figure that does not apply (MFU on a CPU)."""
  return '–' if fraction is None else f'{100 * fraction:.1f} %'


def machine_line(r: dict) -> str:
  """'Machine: …, date. Command: `…`.' for a result from environment()."""
  return (
    f'Machine: {r["machine"]}, {r["cpu_count"]} cores, JAX {r["jax"]} '
    f'({r["backend"]}), {r["date"]}. Command: `{command_line()}`.'
  )


def command_line() -> str:
  return 'python ' + ' '.join(sys.argv)


def _official_rows(r: dict) -> list[str]:
  if 'official' not in r:
    return []
  o = r['official']
  return [
    '',
    f"Against Google's implementation ({o['implementation']}): same job, same",
    'weights, calls alternating between the two so that load from other jobs',
    'hits both alike (`benchmarks/official_codec_speed.py`; codes equal: '
    f'{o["codes_equal"]}):',
    '',
    '| path | official wall s | ours wall s | ours faster by |',
    '|---|---|---|---|',
    *(
      f'| {n} | {o["official"][n]["seconds"]} | {o["ours"][n]["seconds"]} | '
      f'{r[n]["speedup_vs_official"]}× |'
      for n in ('encode', 'decode')
    ),
  ]


def codec_speed_markdown(r: dict) -> str:
  rows = [
    '| path | wall s | RTF | × real time | GFLOP | GFLOP/s | of matmul rate |'
    ' MFU | compile s |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for name in ('encode', 'decode', 'round_trip'):
    m = r[name]
    rows.append(
      f'| {name} | {m["seconds"]} | {m["rtf"]} | {m["x_realtime"]} | '
      f'{m["gflop"]} | {m["gflop_per_s"]} | '
      f'{100 * m["fraction_of_matmul_rate"]:.0f} % | '
      f'{percent(m.get("mfu"))} | {m["compile_seconds"]} |'
    )
  return '\n'.join(
    [
      f'## Codec speed: {r["preset"]}, {r["audio_seconds"]:g} s of 48 kHz '
      f'stereo, {r["levels"]}-level codes',
      '',
      machine_line(r),
      '',
      f'float32 matmul rate measured in the same run: '
      f'**{r["matmul_gflop_per_s"]} GFLOP/s**.',
      '',
      *rows,
      *_official_rows(r),
      '',
      'RTF = wall time / audio duration (best of the repeats, after '
      'compilation). FLOPs are the matrix products and convolutions of '
      'the call (`spectrostream_jax.flops`); MFU is their rate over the '
      "device's float32 peak in `flops.PEAKS` (– on a CPU).",
      '',
      *json_details(r),
    ]
  )

"""Weak scaling of the GAN step: per-device cost at a fixed per-device batch.

    python benchmarks/weak_scaling.py [--experiment experiments/X.gin]
        [--per_device_batch 1] [--devices 1 2 4 8] [--before BEFORE.json]
        [--reuse_json AFTER.json] [--update-docs]

Compiles the trainer's GAN step (`train.jit_programs`, the program a run
uses) for XLA:CPU on 1, 2, 4 and 8 fake devices
(`--xla_force_host_platform_device_count`, one subprocess each; mesh
data = n, fsdp 1), the batch n × `--per_device_batch` crops of the
experiment, with LLVM's optimisation off as the tests compile (the HLO
passes, buffer assignment and cost analysis are the same; only the
machine code, which no figure here reads, differs). Prints one JSON
object with, per device count, the compiled program's per-device FLOPs
(`cost_analysis`), temporaries and peak bytes (`memory_analysis`) and its
all-gathers: with fsdp 1 the parameters are replicated, so each one
gathers activations of the whole batch. Data parallelism scales when the
first three stay flat as devices are added.
`--before`: the JSON of a run on other code (the trainer before a
change), shown next to this one in docs/benchmarks.md by `--update-docs`;
`--reuse_json`: an earlier run's JSON in place of compiling again.
"""

import argparse
import functools
import json
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import gin
from spectrostream_jax.training import sharding
from spectrostream_jax.training import step as step_lib
from spectrostream_jax.training import train

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
MiB = 2**20
FAST_COMPILE = {'xla_backend_optimization_level': 0}
ALL_GATHER = re.compile(r'= (.*?) all-gather(?:-start)?\(')
LAYOUT = re.compile(r'\{[^}]*\}')


def experiment(path: str):
  """(StepConfig, PipelineConfig) as spectrostream-train builds them."""
  gin.clear_config()
  try:
    train.parse_gin([path], [])
    return tuple(
      gin.query_parameter(f'train.{k}').scoped_configurable_fn()
      for k in ('model', 'data')
    )
  finally:
    gin.clear_config()


def measure(path: str, per_device_batch: int) -> dict:
  """Compiles the GAN step on every device of this process; its figures."""
  model, data = experiment(path)
  devices = jax.device_count()
  mesh_config = sharding.MeshConfig(data=devices, fsdp=1)
  mesh = sharding.make_mesh(mesh_config)
  state = jax.eval_shape(functools.partial(step_lib.init_state, model), 0)
  state_sharding = sharding.tree_shardings(mesh, state, mesh_config)
  programs = train.jit_programs(
    model, mesh, 1, state_sharding, [model.codec.quantizer.num_levels], 1
  )
  batch = devices * per_device_batch
  shape = (batch, data.audio.crop_samples, model.codec.num_channels)
  audio = {
    'audio': jax.ShapeDtypeStruct(
      shape, jnp.float32, sharding=sharding.batch_sharding(mesh)
    )
  }
  start = time.perf_counter()
  compiled = programs.train_step.lower(state, audio).compile(FAST_COMPILE)
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  m = compiled.memory_analysis()
  peak = (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    + m.temp_size_in_bytes
    - m.alias_size_in_bytes
  )
  gathers = ALL_GATHER.findall(compiled.as_text())
  return {
    'devices': devices,
    'batch': batch,
    'compile_s': round(seconds, 1),
    'gflop_per_device': round(float(cost['flops']) / 1e9, 2),
    'temp_mib': round(m.temp_size_in_bytes / MiB, 1),
    'peak_mib': round(peak / MiB, 1),
    'all_gathers': len(gathers),
    'gathered': sorted({LAYOUT.sub('', g) for g in gathers}),
  }


def run(path: str, per_device_batch: int, devices: int) -> dict:
  case = {'experiment': path, 'per_device_batch': per_device_batch}
  return report.on_fake_devices(__file__, devices, case)


def with_growth(rows: list[dict]) -> list[dict]:
  """Adds each figure relative to the one-device compile."""
  first = rows[0]
  for row in rows:
    for key in ('gflop_per_device', 'temp_mib', 'peak_mib'):
      row[f'{key}_vs_1'] = round(row[key] / first[key], 3)
  return rows


def table(rows: list[dict]) -> list[str]:
  out = [
    '| devices | global batch | GFLOP per device | temporaries MiB '
    '| peak MiB | all-gathers |',
    '|---|---|---|---|---|---|',
  ]
  for r in rows:
    out.append(
      f'| {r["devices"]} | {r["batch"]} | {r["gflop_per_device"]} '
      f'({r["gflop_per_device_vs_1"]:.3f}×) | {r["temp_mib"]} '
      f'({r["temp_mib_vs_1"]:.3f}×) | {r["peak_mib"]} '
      f'({r["peak_mib_vs_1"]:.3f}×) | {r["all_gathers"]} |'
    )
  return out


def markdown(r: dict) -> str:
  lines = [
    '## Weak scaling: the GAN step per device at a fixed per-device batch',
    '',
    f'Machine: {r["machine"]}, {r["cpu_count"]} cores, JAX {r["jax"]} '
    f'({r["backend"]}), {r["date"]}. Command: `{r["measured_by"]}`.',
    '',
    f'`{r["experiment"]}` ({r["per_device_batch"]} crop of '
    f"{r['crop_samples']} samples per device), the trainer's GAN step "
    'compiled for XLA:CPU on n fake devices (mesh data = n, fsdp 1), '
    "figures per device from XLA's `cost_analysis` and "
    '`memory_analysis` (peak = arguments + outputs + temporaries − '
    'donated); in brackets, relative to one device. With fsdp 1 the '
    'parameters are replicated: each all-gather gathers activations of '
    'the whole batch.',
    '',
  ]
  if 'before' in r:
    lines += [
      f'Before (`{r["before"]["measured_by"]}` on {r["before"]["code"]}):',
      '',
      *table(r['before']['rows']),
      '',
      f'After ({r["code"]}):',
      '',
    ]
  lines += [*table(r['rows']), '', *report.json_details(r)]
  return '\n'.join(lines)


def git_head() -> str:
  """The commit of the spectrostream_jax this run imports."""
  out = subprocess.run(
    ['git', 'log', '-1', '--format=%h %s'],
    cwd=pathlib.Path(step_lib.__file__).parent,
    capture_output=True,
    text=True,
    check=False,
  )
  return out.stdout.strip() or 'unknown'


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  # The small model works too, at about 5 minutes a compile on 2 cores.
  ap.add_argument('--experiment', default='experiments/quickstart.gin')
  ap.add_argument('--per_device_batch', type=int, default=1)
  ap.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4, 8])
  ap.add_argument('--before', help="an earlier run's JSON, to show with")
  ap.add_argument('--reuse_json', help="an earlier run's JSON, not rerun")
  ap.add_argument('--update-docs', action='store_true')
  ap.add_argument('--case', help='internal: one compile (JSON)')
  args = ap.parse_args()
  if args.case:
    case = json.loads(args.case)
    print(json.dumps(measure(case['experiment'], case['per_device_batch'])))
    return
  if args.reuse_json:
    with open(args.reuse_json, encoding='utf-8') as f:
      result = json.load(f)
  else:
    result = compile_all(args)
  if args.before:
    with open(args.before, encoding='utf-8') as f:
      result['before'] = json.load(f)
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('weak_scaling', result, markdown)


def compile_all(args) -> dict:
  """One compile per device count, in subprocesses."""
  _, data = experiment(args.experiment)
  result = {
    'benchmark': 'weak_scaling',
    **report.environment(),
    'measured_by': report.command_line(),
    'code': git_head(),
    'experiment': args.experiment,
    'per_device_batch': args.per_device_batch,
    'crop_samples': data.audio.crop_samples,
    'rows': [],
  }
  for devices in args.devices:
    result['rows'].append(run(args.experiment, args.per_device_batch, devices))
    print(json.dumps(result['rows'][-1]), file=sys.stderr)
  with_growth(result['rows'])
  return result


if __name__ == '__main__':
  main()

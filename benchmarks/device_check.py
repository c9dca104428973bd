"""One command that checks and measures the codec on whatever JAX sees.

    python benchmarks/device_check.py [--manifest M.jsonl] [--train-seconds 60]
        [--vectors DIR] [--compile-cache DIR] [--workdir DIR] [--quick]
        [--update-docs]

Stages, in this order, each one failing alone with a one-line reason (a
missing optional package, say) while the others run:

1. `parity`: the reference vectors of Google's code (../shared/vectors, or
   `--vectors`) recomputed on the device under JAX's default precision
   (TF32 on NVIDIA GPUs) and, off CPU, under 'highest'.
2. `codec_speed`: whole-sequence encode and decode of 10 s of production
   (benchmarks/codec_speed.py).
3. `streaming`: per-frame streaming encode and decode of production
   (benchmarks/streaming.py).
4. `train_step`: step time, compile time, FLOPs and MFU of the small and
   production GAN steps (benchmarks/train_step.py) in bfloat16, then after
   the training run in float32.
5. `train`: `spectrostream-train` in a subprocess for `--train-seconds`
   after its first step (the small model on `--manifest`, else on the
   synthetic source), stopped with Ctrl-C (it saves a checkpoint and exits
   130), then `spectrostream-export` of that checkpoint; the model
   directory's path is printed.

Prints one JSON object on stdout (logs go to stderr); `--update-docs`
writes its section of docs/benchmarks.md. Stages started after
`--budget-seconds` are skipped. `--quick` runs the same stages on the tiny
preset with tiny batches and a few seconds of training (CI on CPU).
docs/device_check.md says how to run it on a GPU machine.
"""

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import pathlib
import re
import runpy
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

import jax
import numpy as np

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
VECTORS = ROOT.parent / 'shared' / 'vectors'
# The vectors' README ("GPU warning"): TF32 errors are about 1e-3 of the
# peak; 5e-3 relative is the tolerance it suggests at default precision.
TF32_RELATIVE = 5e-3

# (model, experiment, batch, crop seconds) per train-step case. Full: the
# batch of the H200 run in docs/device_check.md for small, and the
# per-GPU batch of the published 128 on 8 GPUs (gin/hardware/gpu8.gin)
# for production.
FULL_STEPS = (
  ('small', 'experiments/small_debian.gin', 64, 0.64),
  ('production', 'experiments/production_debian.gin', 16, 1.28),
)
QUICK_STEPS = (('tiny', 'experiments/quickstart.gin', 1, 0.16),)


# Parity ----------------------------------------------------------------------


def parity_tolerances() -> dict[str, float]:
  """TOL of tests/test_parity.py, read without importing pytest."""
  tree = ast.parse((ROOT / 'tests' / 'test_parity.py').read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and node.targets[0].id == 'TOL':
      return ast.literal_eval(node.value)
  raise LookupError('tests/test_parity.py has no TOL')


def parity(vectors_dir: pathlib.Path) -> dict:
  """Max |error| against the official outputs, per array and precision."""
  from spectrostream_jax import signal as signal_lib
  from spectrostream_jax import weights
  from spectrostream_jax.models import codec as codec_lib
  from spectrostream_jax.models import quantizer

  npz = vectors_dir / 'mrt_parity_A' / 'vectors.npz'
  if not npz.is_file():
    raise FileNotFoundError(f'no {npz}: pass --vectors DIR')
  data = np.load(npz)
  ref = {k.removeprefix('L96000_'): data[k] for k in data.files}
  made = runpy.run_path(str(vectors_dir / 'make_params.py'))['make_params']
  flat = {k.removeprefix('params/'): v for k, v in made(0).items()}
  p = jax.device_put(weights.unflatten(flat))
  cfg = codec_lib.production()
  m = codec_lib.SpectroStream(cfg)
  call = jax.jit(
    lambda p, x, method: m.apply({'params': p}, x, method=method),
    static_argnums=2,
  )
  cb = p['quantizer']['embedding']
  tol = parity_tolerances()
  out = {'device': str(jax.devices()[0].device_kind)}
  precisions = ['default'] + (
    ['highest'] if jax.default_backend() != 'cpu' else []
  )
  for precision in precisions:
    context = (
      contextlib.nullcontext()
      if precision == 'default'
      else jax.default_matmul_precision(precision)
    )
    with context:
      q64 = quantizer.decode(cb, ref['codes'])
      ours = {
        'stft': signal_lib.stft(ref['wave_in']),
        'emb': call(p, ref['wave_in'], m.embed),
        'qemb64': q64,
        'qemb16': quantizer.decode(cb, ref['codes'][..., :16]),
        'feat64': call(p, q64, m.decode_features),
        'feat_unq': call(p, ref['emb'], m.decode_features),
        'wav64': call(p, ref['codes'], m.decode),
        'wav16': call(p, ref['codes'][..., :16], m.decode),
        'wav_unq': call(p, ref['emb'], m.decode_embeddings),
      }
      codes = quantizer.encode(cb, ref['emb'], 64)
      own_codes = call(p, ref['wave_in'], m.encode)
    arrays = {}
    for name, value in ours.items():
      err = float(np.max(np.abs(np.asarray(value) - ref[name])))
      peak = float(np.max(np.abs(ref[name])))
      arrays[name] = {
        'max_abs_error': float(f'{err:.3g}'),
        'relative_to_peak': float(f'{err / peak:.3g}'),
        'tolerance': tol[name],
        'within_tolerance': err <= tol[name],
      }
    out[precision] = {
      'arrays': arrays,
      'all_within_tolerance': all(
        a['within_tolerance'] for a in arrays.values()
      ),
      'worst_relative_to_peak': max(
        a['relative_to_peak'] for a in arrays.values()
      ),
      'within_tf32_relative_tolerance': all(
        a['relative_to_peak'] <= TF32_RELATIVE for a in arrays.values()
      ),
      'codes_from_oracle_embeddings_mismatches': int(
        np.sum(np.asarray(codes) != ref['codes'])
      ),
      'end_to_end_codes_differing': int(
        np.sum(np.asarray(own_codes) != ref['codes'])
      ),
      'codes_total': int(ref['codes'].size),
    }
  return out


# Speed -----------------------------------------------------------------------


def codec_speed(quick: bool) -> dict:
  """Whole-sequence encode, decode and round trip (codec_speed.run)."""
  try:
    from benchmarks import codec_speed as bench
  except ImportError:
    import codec_speed as bench
  if quick:
    return bench.run('tiny', 1.0, None, repeats=1)
  return bench.run('production', 10.0, None, repeats=3)


def streaming(quick: bool) -> dict:
  """Frame-by-frame streaming against the whole sequence (streaming.run)."""
  try:
    from benchmarks import streaming as bench
  except ImportError:
    import streaming as bench
  if quick:
    return bench.run('tiny', 8, None, rounds=1, frames_per_step=[])
  return bench.run('production', 50, None, rounds=2, frames_per_step=[4])


def device_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit')
  return None if limit is None else round(limit / 2**30, 2)


def train_step(
  model: str,
  experiment: str,
  batch: int,
  seconds: float,
  dtype: str,
  quick: bool,
) -> dict:
  """One case of train_step.measure, with its share of device memory."""
  try:
    from benchmarks import train_step as bench
  except ImportError:
    import train_step as bench
  config = bench.step_config(experiment, dtype)
  m = bench.measure(
    config, batch, seconds, 1 if quick else 3, gradient_norms=False
  )
  memory = device_memory_gib()
  m['model'] = model
  m['device_memory_gib'] = memory
  m['xla_peak_of_device_memory'] = (
    None if memory is None else round(m['xla_peak_gib'] / memory, 3)
  )
  return m


# Training run ----------------------------------------------------------------


def console(name: str) -> list[str]:
  """argv running console script `name` from this tree, where
  pyproject.toml's [project.scripts] points it."""
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    module, func = tomllib.load(f)['project']['scripts'][name].split(':')
  code = f'import {module} as m; m.{func}()'
  return [sys.executable, '-c', code]


# No evaluation and no periodic save: the Ctrl-C save is the checkpoint.
NEVER = 10**9


def train_gin(quick: bool, manifest: str | None) -> list[str]:
  """The trainer's --gin_file and --gin_bindings flags."""
  files = ['experiments/quickstart.gin']
  bindings = ['PipelineConfig.batch_size = 2']
  if not quick:
    files = ['experiments/small_debian.gin']
    hardware = {'gpu': 'hardware/gpu8.gin', 'tpu': 'hardware/tpu_pod.gin'}
    if jax.default_backend() in hardware:
      files.append(hardware[jax.default_backend()])
    bindings = [f'PipelineConfig.batch_size = {FULL_STEPS[0][2]}']
    if not manifest:
      bindings += [
        f'{split}/pipeline.PipelineConfig.sources = '
        '(@sources.SyntheticSource(),)'
        for split in ('training', 'held_out')
      ]
  if manifest:
    if quick:
      # Its scoped sources override quickstart's synthetic one.
      files.append('data/debian.gin')
    bindings.append(f'DEBIAN_MANIFEST = {os.path.abspath(manifest)!r}')
  if quick:
    # GAN steps from the first: the trainer compiles only the programs a
    # run will use, before its first step (no warm-up step to compile).
    bindings.append('StepConfig.warmup_steps = 0')
  bindings += [
    f'train.num_steps = {NEVER}',
    # Stopped by Ctrl-C, the run never evaluates: no eval program.
    'train.eval_every = 0',
    f'CheckpointConfig.every = {NEVER}',
    'train.log_every = 5',
    # The per-term gradient norms are a program of their own to compile.
    'train.log_grad_norms = False',
  ]
  return [f'--gin_file={f}' for f in files] + [
    f'--gin_bindings={b}' for b in bindings
  ]


class Lines:
  """Collects a subprocess's output lines, echoing them to stderr."""

  def __init__(self, stream):
    self.lines: list[tuple[float, str]] = []
    self._thread = threading.Thread(target=self._read, args=(stream,))
    self._thread.start()

  def _read(self, stream):
    for line in stream:
      self.lines.append((time.monotonic(), line.rstrip()))
      print(line, end='', file=sys.stderr)

  def join(self):
    self._thread.join()

  def first(self, pattern: str):
    """(time, match) of the first line matching `pattern`, else None."""
    for t, line in list(self.lines):
      if m := re.search(pattern, line):
        return t, m
    return None

  def last(self, pattern: str):
    for t, line in reversed(list(self.lines)):
      if m := re.search(pattern, line):
        return t, m
    return None

  def tail(self, n: int = 5) -> str:
    return ' / '.join(line for _, line in self.lines[-n:])


STEP = r'step (\d+)/\d+ .*\| ([\d.]+) steps/s'


def train_run(
  workdir: pathlib.Path,
  seconds: float,
  quick: bool,
  manifest: str | None,
  cache: str | None,
) -> dict:
  """Trains for `seconds` after the first step, Ctrl-C, then exports."""
  needed = ['gin', 'grain', 'orbax', 'tensorboardX', 'optax']
  if manifest:
    needed.append('soundfile')
  missing = [n for n in needed if importlib.util.find_spec(n) is None]
  if missing:
    raise ModuleNotFoundError(f'the trainer needs {", ".join(missing)}')
  env = dict(os.environ)
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = cache
    env['SPECTROSTREAM_COMPILE_CACHE'] = cache
  flags = [f'--workdir={workdir / "run"}', *train_gin(quick, manifest)]
  start = time.monotonic()
  proc = subprocess.Popen(
    [*console('spectrostream-train'), *flags],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  out = Lines(proc.stdout)
  # Compiling may take minutes; the clock starts at the first step.
  first = None
  while proc.poll() is None and time.monotonic() - start < 900:
    first = first or out.first(STEP)
    if first and time.monotonic() - first[0] >= seconds:
      break
    time.sleep(0.2)
  stopped = time.monotonic()
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)
  try:
    code = proc.wait(timeout=300)
  except subprocess.TimeoutExpired:
    proc.kill()
    code = proc.wait()
  out.join()
  saved = out.last(r'checkpoint (\d+) saved')
  if code != 130 or not saved:
    raise RuntimeError(f'trainer exited {code}: {out.tail()}')
  first_step = int(first[1].group(1))
  last_step = int(saved[1].group(1))
  compiled = out.first(r'compiled in ([\d.]+) s')
  gflop = out.first(r'([\d.e+]+) GFLOP')
  logged = out.last(STEP)
  result = {
    'command': shlex.join(['spectrostream-train', *flags]),
    'seconds_to_first_step': round(first[0] - start, 1),
    'trained_seconds': round(stopped - first[0], 1),
    'steps': last_step,
    'steps_per_second': round(
      (last_step - first_step) / (stopped - first[0]), 2
    ),
    'last_logged_steps_per_second': float(logged[1].group(2)),
    'trainer_compile_seconds': compiled and float(compiled[1].group(1)),
    'trainer_logged_gflop': gflop and float(gflop[1].group(1)),
  }
  model = workdir / 'model'
  cmd = [
    *console('spectrostream-export'),
    f'--workdir={workdir / "run"}',
    f'--out={model}',
    '--overwrite',
  ]
  if quick:
    cmd.append('--platforms=cpu')
  start = time.monotonic()
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f'export failed: {done.stderr.strip()[-500:]}')
  result['export_seconds'] = round(time.monotonic() - start, 1)
  result['export'] = str(model)
  result['model_id'] = done.stdout.split('model_id ')[-1].strip()
  print(f'device_check: exported model at {model}', file=sys.stderr)
  return result


# Driver ----------------------------------------------------------------------


def enable_cache(directory: str) -> dict:
  """The persistent compilation cache, and how full it was at the start.

  Run the check twice with one directory: the second run's compile times
  are the warm ones.
  """
  os.makedirs(directory, exist_ok=True)
  before = len(os.listdir(directory))
  if importlib.util.find_spec('spectrostream_jax.compile_cache'):
    from spectrostream_jax import compile_cache

    directory = compile_cache.enable(directory) or directory
  else:
    jax.config.update('jax_compilation_cache_dir', directory)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return {'directory': directory, 'entries_before': before, 'warm': before > 0}


def run_stage(result: dict, name: str, deadline: float, fn, *args) -> None:
  """result[name] = fn(*args), or the reason it failed or was skipped."""
  if time.monotonic() > deadline:
    result[name] = {'skipped': 'past --budget-seconds'}
    return
  print(f'device_check: {name}', file=sys.stderr)
  start = time.monotonic()
  try:
    result[name] = fn(*args)
  except Exception as e:  # One stage's failure must not end the others.
    reason = f'{type(e).__name__}: {e}'.splitlines()[0]
    if isinstance(e, ModuleNotFoundError):
      reason += ' (install it, or carry its wheel: docs/device_check.md)'
    result[name] = {'error': reason}
  result[name]['stage_seconds'] = round(time.monotonic() - start, 1)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--manifest', help='corpus manifest for the training run')
  ap.add_argument('--train-seconds', type=float, default=None)
  ap.add_argument('--vectors', default=str(VECTORS))
  ap.add_argument('--compile-cache', help='persistent compilation cache dir')
  ap.add_argument('--workdir', help='training run and export (default: tmp)')
  ap.add_argument(
    '--budget-seconds',
    type=float,
    help='start no stage after this (default: 480; none with --quick)',
  )
  ap.add_argument('--quick', action='store_true', help='tiny, for CI on CPU')
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()
  start = time.monotonic()
  budget = args.budget_seconds or (float('inf') if args.quick else 480.0)
  deadline = start + budget
  train_seconds = args.train_seconds or (5.0 if args.quick else 60.0)
  workdir = pathlib.Path(
    args.workdir or tempfile.mkdtemp(prefix='device_check_')
  )
  result = {
    'benchmark': 'device_check',
    'quick': args.quick,
    **report.environment(),
    'devices': jax.device_count(),
    'command': report.command_line(),
    # Other jobs on the machine slow every figure: a load above the core
    # count means they shared it.
    'load_before': [round(x, 2) for x in os.getloadavg()],
  }
  if args.compile_cache:
    result['compile_cache'] = enable_cache(args.compile_cache)
  stage = lambda name, fn, *a: run_stage(result, name, deadline, fn, *a)
  stage('parity', parity, pathlib.Path(args.vectors))
  stage('codec_speed', codec_speed, args.quick)
  stage('streaming', streaming, args.quick)
  cases = QUICK_STEPS if args.quick else FULL_STEPS
  dtypes = ('float32',) if args.quick else ('bfloat16', 'float32')
  for dtype in dtypes:
    if dtype == 'float32':
      stage(
        'train',
        train_run,
        workdir,
        train_seconds,
        args.quick,
        args.manifest,
        args.compile_cache,
      )
    for model, experiment, batch, seconds in cases:
      stage(
        f'train_step/{model}/{dtype}',
        train_step,
        model,
        experiment,
        batch,
        seconds,
        dtype,
        args.quick,
      )
  result['total_seconds'] = round(time.monotonic() - start, 1)
  result['load_after'] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('device_check', result, markdown)


def markdown(r: dict) -> str:
  lines = [
    f'## Device check: {r["device"]} × {r["devices"]}',
    '',
    report.machine_line(r),
    '',
    f'{r["total_seconds"]:g} s in all. Load average (1, 5, 15 min) '
    f'{_loads(r["load_before"])} before and {_loads(r["load_after"])} '
    f'after, on {r["cpu_count"]} cores. What each figure is and how to run '
    'it: docs/device_check.md.',
    '',
  ]
  failed = [
    f'- `{name}`: {v.get("error") or v.get("skipped")}'
    for name, v in r.items()
    if isinstance(v, dict) and ('error' in v or 'skipped' in v)
  ]
  if failed:
    lines += ['Stages that did not run:', '', *failed, '']
  lines += _parity_lines(r.get('parity', {}))
  lines += _speed_lines(r.get('codec_speed', {}), r.get('streaming', {}))
  lines += _train_lines(r)
  return '\n'.join([*lines, *report.json_details(r)])


def _loads(values: list[float]) -> str:
  return ', '.join(f'{v:g}' for v in values)


def _parity_lines(p: dict) -> list[str]:
  rows = [
    f'| {name} | {"yes" if v["all_within_tolerance"] else "no"} | '
    f'{v["worst_relative_to_peak"]:.2g} | '
    f'{"yes" if v["within_tf32_relative_tolerance"] else "no"} | '
    f'{v["codes_from_oracle_embeddings_mismatches"]} | '
    f'{v["end_to_end_codes_differing"]} of {v["codes_total"]} |'
    for name, v in p.items()
    if name in ('default', 'highest')
  ]
  if not rows:
    return []
  return [
    "Parity with the reference vectors (tests/test_parity.py's tolerances):",
    '',
    "| precision | within the tests' tolerances | worst error / peak "
    f'| within {TF32_RELATIVE:g} of peak | codes from the reference '
    'embeddings, mismatches | own codes differing |',
    '|---|---|---|---|---|---|',
    *rows,
    '',
  ]


def _speed_lines(c: dict, s: dict) -> list[str]:
  lines = []
  if 'encode' in c:
    lines += [
      f'Whole sequence, {c["preset"]}, {c["audio_seconds"]:g} s: '
      + '; '.join(
        f'{n} {1000 * c[n]["seconds"]:.1f} ms ({c[n]["x_realtime"]}× real '
        f'time, {c[n]["gflop"]} GFLOP, MFU {report.percent(c[n]["mfu"])})'
        for n in ('encode', 'decode')
      )
      + '.',
      '',
    ]
  if 'encode' in s:
    d = s['device_step']
    lines += [
      f'Streaming, {s["preset"]}, one 40 ms frame per call: '
      + '; '.join(
        f'{n} {s[n]["median_ms"]} ms median ({s[n]["ratio"]}× the whole '
        f'sequence per frame; device step {d[n]["median_ms"]} ms, MFU '
        f'{report.percent(d[n]["mfu"])})'
        for n in ('encode', 'decode')
      )
      + '.',
      '',
    ]
  return lines


def _train_lines(r: dict) -> list[str]:
  rows = []
  for name, m in r.items():
    if not name.startswith('train_step/') or 'step_seconds' not in m:
      continue
    share = m['xla_peak_of_device_memory']
    rows.append(
      f'| {m["model"]} | {m["dtype"]} | {m["batch"]} × {m["crop_seconds"]} s'
      f' | {m["steps_per_second"]} | {m["warmup_steps_per_second"]} | '
      f'{m["gflop"]} | {report.percent(m["mfu"])} | '
      f'{m["compile_seconds"]} | {m["xla_peak_gib"]}'
      + ('' if share is None else f' ({report.percent(share)})')
      + ' |'
    )
  lines = []
  if rows:
    lines += [
      '| model | dtype | batch × crop | GAN steps/s | warm-up steps/s | '
      'GFLOP per step | MFU | compile s | XLA peak GiB (of device) |',
      '|---|---|---|---|---|---|---|---|---|',
      *rows,
      '',
    ]
  t = r.get('train', {})
  if 'export' in t:
    lines += [
      f'Training run: {t["steps"]} steps, {t["steps_per_second"]} steps/s '
      f'over {t["trained_seconds"]} s after {t["seconds_to_first_step"]} s '
      f'to the first step; exported in {t["export_seconds"]} s to '
      f'`{t["export"]}`. Command: `{t["command"]}`.',
      '',
    ]
  return lines


if __name__ == '__main__':
  main()

"""A sized plan for the production run on a pod, from XLA's own figures.

    python benchmarks/sized_plan.py [--corpus /tmp/debian_music/manifest.jsonl]
        [--skip_memory] [--skip_input] [--update_docs]

For the production experiment (gin/experiments/production_debian.gin with a
hardware file: batch 128 × 1.32 s, i.e. 1.28 s plus the look-ahead frame)
it prints one JSON object with:

- `flops`: FLOPs of one GAN train step (`spectrostream_jax.flops`: the
  matrix products and convolutions of the traced program, before
  partitioning), so a global figure for the whole batch; at batch 8,
  16 and 128 (linearity), in bfloat16 (the hardware files' compute dtype)
  and float32; next to it the codec's forward pass alone, for a rough
  hand count (a training step is about 3× the forward FLOPs of the
  networks it differentiates).
- `memory`: per-device arguments, outputs and temporaries from
  `compiled.memory_analysis()` of the trainer's own step program
  (`train.jit_programs`) compiled for XLA:CPU on 8 fake devices
  (`--xla_force_host_platform_device_count`, one subprocess per case)
  with the per-device batch a pod would have and fsdp 1, 4 and 8.
- `projection`: step time and examples/s = FLOPs / (chips × peak × MFU)
  on TPU v5e-256, v5p-128 and 8 × H100 at 30 % and 50 % MFU, with the
  peaks' sources, and the examples/s each host must then deliver.
- `input`: benchmarks/data_throughput.py run in a subprocess with the
  grain worker count of gin/hardware/tpu_pod.gin (and 0) at the
  production crop, per host of this machine.

`--update_docs` writes the figures into docs/benchmarks.md. What is
measured here and what is projected is said in docs/training.md, "A sized
plan".
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import gin
from spectrostream_jax import flops as flops_lib
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.training import sharding
from spectrostream_jax.training import step as step_lib
from spectrostream_jax.training import train

try:
  from benchmarks import report
  from benchmarks import train_step
except ImportError:  # Run as a script from the repository root.
  import report
  import train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]

EXPERIMENT = 'experiments/production_debian.gin'
GLOBAL_BATCH = 128  # The published batch (docs/training.md).
MFUS = (0.3, 0.5)
GiB = 2**30

# Memory per chip, chips per host, and the chip's `flops.PEAKS` entry
# (`project` reads the dense bf16 peak and its source from there).
HARDWARE = {
  'v5e-256': {
    'gin': 'hardware/tpu_pod.gin',
    'device_kind': 'TPU v5 lite',
    'chips': 256,
    'chips_per_host': 8,
    'hbm_gib': 16.0,
    'host_vcpus': 224,
    'note': 'v5e names count chips; 16x16 slice: 256 chips on 32 hosts '
    'of 8 chips (ct5lp-hightpu-8t, 224 vCPUs)',
  },
  'v5p-128': {
    'gin': 'hardware/tpu_pod.gin',
    'device_kind': 'TPU v5p',
    'chips': 64,
    'chips_per_host': 4,
    'hbm_gib': 95e9 / GiB,
    'host_vcpus': 208,
    'note': 'v5p names count TensorCores (2 per chip): v5p-128 is a '
    '4x4x4 cube, 64 chips on 16 hosts of 4 chips (208 vCPUs)',
  },
  '8xH100': {
    'gin': 'hardware/gpu8.gin',
    'device_kind': 'NVIDIA H100 80GB HBM3',
    'chips': 8,
    'chips_per_host': 8,
    'hbm_gib': 80e9 / GiB,
    'host_vcpus': None,
    'note': 'H100 SXM: 1979 TFLOP/s bf16 "with sparsity", half of it '
    'dense; one host of 8 GPUs',
  },
}


# Configs ---------------------------------------------------------------------


def experiment(hardware: str, dtype: str | None = None):
  """(StepConfig, PipelineConfig, MeshConfig) as spectrostream-train builds."""
  gin.clear_config()
  try:
    train.parse_gin([EXPERIMENT, hardware], train_step.dtype_bindings(dtype))
    return tuple(
      gin.query_parameter(f'train.{k}').scoped_configurable_fn()
      for k in ('model', 'data', 'mesh')
    )
  finally:
    gin.clear_config()


def audio_struct(batch: int, crop: int, channels: int, sharding=None):
  shape = (batch, crop, channels)
  return {'audio': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}


# FLOPs -----------------------------------------------------------------------


def flops(dtype: str) -> dict:
  """Global FLOPs of one GAN step at batch 8, 16 and 128."""
  model, data, _ = experiment('hardware/tpu_pod.gin', dtype)
  crop, channels = data.audio.crop_samples, model.codec.num_channels
  state = jax.eval_shape(functools.partial(step_lib.init_state, model), 0)
  step = jax.jit(functools.partial(step_lib.train_step, model))
  out = {'dtype': model.codec.dtype, 'crop_samples': crop}
  for batch in (8, 16, GLOBAL_BATCH):
    audio = audio_struct(batch, crop, channels)
    out[f'step_gflop_b{batch}'] = round(
      flops_lib.count(step, state, audio) / 1e9, 1
    )
  per8, per16 = out['step_gflop_b8'] / 8, out['step_gflop_b16'] / 16
  out['gflop_per_example'] = round(out[f'step_gflop_b{GLOBAL_BATCH}'] / 128, 1)
  out['linearity_b16_over_b8'] = round(per16 / per8, 4)
  # The codec's forward pass alone (encoder, RVQ, decoder).
  net = codec_lib.SpectroStream(model.codec)
  params = codec_lib.param_shapes(model.codec)
  forward = jax.jit(lambda p, w, r: net.apply({'params': p}, w, r))
  wav = audio_struct(8, crop, channels)['audio']
  out['codec_forward_gflop_per_example'] = round(
    flops_lib.count(forward, params, wav, jax.random.key(0)) / 8e9, 1
  )
  return out


# Memory: one compile per subprocess ------------------------------------------


def memory_case(case: dict) -> dict:
  """Compiles the trainer's GAN step on fake CPU devices; per-device bytes."""
  model, data, mesh_config = experiment(case['gin'], case.get('dtype'))
  mesh_config = dataclasses.replace(mesh_config, data=-1, fsdp=case['fsdp'])
  mesh = sharding.make_mesh(mesh_config)
  state = jax.eval_shape(functools.partial(step_lib.init_state, model), 0)
  state_sharding = sharding.tree_shardings(mesh, state, mesh_config)
  programs = train.jit_programs(
    model,
    mesh,
    1,
    state_sharding,
    [model.codec.quantizer.num_levels],
    1,
  )
  batch = mesh.size * case['per_device_batch']
  audio = audio_struct(
    batch,
    data.audio.crop_samples,
    model.codec.num_channels,
    sharding.batch_sharding(mesh),
  )
  start = time.perf_counter()
  compiled = programs.train_step.lower(state, audio).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  # The train state's bytes on one device under these shardings.
  leaves = zip(
    jax.tree.leaves(state), jax.tree.leaves(state_sharding), strict=True
  )
  state_bytes = sum(
    leaf.size * leaf.dtype.itemsize // _split(s, mesh) for leaf, s in leaves
  )
  peak = (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    + m.temp_size_in_bytes
    - m.alias_size_in_bytes
  )
  return {
    **case,
    'devices': mesh.size,
    'mesh': dict(mesh.shape),
    'dtype': model.codec.dtype,
    'compile_s': round(seconds, 1),
    'state_gib': round(state_bytes / GiB, 3),
    'argument_gib': round(m.argument_size_in_bytes / GiB, 3),
    'output_gib': round(m.output_size_in_bytes / GiB, 3),
    'alias_gib': round(m.alias_size_in_bytes / GiB, 3),
    'temp_gib': round(m.temp_size_in_bytes / GiB, 3),
    'peak_gib': round(peak / GiB, 3),
  }


def _split(named_sharding, mesh) -> int:
  n = 1
  for entry in named_sharding.spec:
    for axis in (entry,) if isinstance(entry, str) else entry or ():
      n *= mesh.shape[axis]
  return n


MEMORY_CASES = (
  # v5p-128: 128 / 64 chips = 2 examples per chip; the fsdp degrees.
  {'gin': 'hardware/tpu_pod.gin', 'per_device_batch': 2, 'fsdp': 1},
  {'gin': 'hardware/tpu_pod.gin', 'per_device_batch': 2, 'fsdp': 4},
  {'gin': 'hardware/tpu_pod.gin', 'per_device_batch': 2, 'fsdp': 8},
  # v5e: 1 example per chip (v5e-128 at batch 128, v5e-256 at 256).
  {'gin': 'hardware/tpu_pod.gin', 'per_device_batch': 1, 'fsdp': 4},
  # 8 x H100: 128 / 8 = 16 per GPU, gpu8.gin's mesh.
  {'gin': 'hardware/gpu8.gin', 'per_device_batch': 16, 'fsdp': 1},
)


def run_case(case: dict, devices: int) -> dict:
  return report.on_fake_devices(__file__, devices, case)


# Input -----------------------------------------------------------------------


def input_rate(corpus: str, workers: int, per_host_batch: int) -> dict:
  """benchmarks/data_throughput.py's JSON (pipeline only)."""
  cmd = [
    sys.executable,
    str(ROOT / 'benchmarks' / 'data_throughput.py'),
    f'--corpus={corpus}',
    f'--workers=0,{workers}',
    f'--batch_size={per_host_batch}',
    '--batches=40',
    '--model_steps=0',
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(out.stderr[-2000:])
  text = out.stdout
  return {
    'command': 'python benchmarks/data_throughput.py '
    + ' '.join(cmd[2:]).replace(str(ROOT) + '/', ''),
    **json.loads(text[text.index('{') :]),
  }


# Projection ------------------------------------------------------------------


def gin_workers(hardware: str) -> int:
  """The grain worker count a hardware file binds."""
  gin.clear_config()
  try:
    train.parse_gin([EXPERIMENT, hardware], [])
    data = gin.query_parameter('train.data').scoped_configurable_fn()
    return data.num_workers
  finally:
    gin.clear_config()


def project(gflop_per_example: float, per_worker: float | None) -> dict:
  """Step time, examples/s and input needs per hardware and MFU.

  `per_worker`: examples/s of one pipeline process measured here (the
  0-worker figure); the host's input rate is then assumed to grow
  linearly with the workers, one free core each.
  """
  out = {}
  for name, hw in HARDWARE.items():
    peak = flops_lib.peak(hw['device_kind'])
    hw = {**hw, 'peak_tflops': peak.bfloat16 / 1e12, 'source': peak.source}
    chips = hw['chips']
    # The trainer splits the batch over every device: at least one
    # example each, so a pod wider than the batch needs a larger batch.
    batch = max(GLOBAL_BATCH, chips)
    hosts = max(1, chips // hw['chips_per_host'])
    workers = gin_workers(hw['gin'])
    entry = {
      **hw,
      'batch': batch,
      'per_device_batch': batch // chips,
      'hosts': hosts,
      'gin_workers': workers,
    }
    if per_worker:
      entry['input_examples_per_s_per_host_if_linear'] = round(
        per_worker * workers
      )
    for mfu in MFUS:
      rate = chips * hw['peak_tflops'] * 1e12 * mfu
      step_s = batch * gflop_per_example * 1e9 / rate
      need = batch / step_s / hosts
      row = {
        'step_ms': round(1e3 * step_s, 2),
        'examples_per_s': round(batch / step_s),
        'examples_per_s_per_host': round(need),
      }
      if per_worker:
        row['workers_needed_if_linear'] = math.ceil(need / per_worker)
      entry[f'mfu_{round(mfu * 100)}'] = row
    out[name] = entry
  return out


# Report ----------------------------------------------------------------------


def markdown(r: dict) -> str:
  f = r['flops']
  lines = [
    '## Sized plan: production step at batch 128 on a pod',
    '',
    report.machine_line(r),
    '',
    f'FLOPs, memory and input measured by `{r["measured_by"]}`.',
    '',
    'FLOPs: the matrix products and convolutions of the GAN step '
    '(`spectrostream_jax.flops`; global, whole batch, before partitioning):',
    '',
    '| dtype | GFLOP b8 | GFLOP b16 | GFLOP b128 | GFLOP/example |'
    ' b16/b8 per example | codec forward GFLOP/example |',
    '|---|---|---|---|---|---|---|',
  ]
  for d in f.values():
    lines.append(
      f'| {d["dtype"]} | {d["step_gflop_b8"]} | {d["step_gflop_b16"]} | '
      f'{d[f"step_gflop_b{GLOBAL_BATCH}"]} | {d["gflop_per_example"]} | '
      f'{d["linearity_b16_over_b8"]} | '
      f'{d["codec_forward_gflop_per_example"]} |'
    )
  if r.get('memory'):
    lines += [
      '',
      "Per-device memory: `compiled.memory_analysis()` of the trainer's "
      f'GAN step compiled for XLA:CPU on {r["memory"][0]["devices"]} fake '
      'devices (GiB; peak = arguments + outputs + temporaries − aliased):',
      '',
      '| hardware file | dtype | per-device batch | mesh (data × fsdp) |'
      ' state | arguments | temporaries | peak | compile s |',
      '|---|---|---|---|---|---|---|---|---|',
    ]
    for m in r['memory']:
      lines.append(
        f'| {m["gin"]} | {m["dtype"]} | {m["per_device_batch"]} | '
        f'{m["mesh"]["data"]} × {m["mesh"]["fsdp"]} | {m["state_gib"]} | '
        f'{m["argument_gib"]} | {m["temp_gib"]} | {m["peak_gib"]} | '
        f'{m["compile_s"]} |'
      )
  lines += [
    '',
    'Projected (not measured): step time = batch × GFLOP/example / '
    '(chips × peak × MFU), bf16 figures:',
    '',
    '| hardware | chips | hosts | batch | peak TFLOP/s/chip | step ms '
    '(30 % / 50 %) | examples/s (30 % / 50 %) | per host (30 % / 50 %) |'
    ' gin workers | workers needed (30 % / 50 %) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for name, p in r['projection'].items():
    a, b = p['mfu_30'], p['mfu_50']
    needed = ' / '.join(
      str(m.get('workers_needed_if_linear', '–')) for m in (a, b)
    )
    lines.append(
      f'| {name} | {p["chips"]} | {p["hosts"]} | {p["batch"]} | '
      f'{p["peak_tflops"]:g} ([source]({p["source"]})) | '
      f'{a["step_ms"]} / {b["step_ms"]} | '
      f'{a["examples_per_s"]} / {b["examples_per_s"]} | '
      f'{a["examples_per_s_per_host"]} / {b["examples_per_s_per_host"]} | '
      f'{p["gin_workers"]} | {needed} |'
    )
  lines += [
    '',
    'Workers needed assumes the host rate grows linearly with grain '
    'workers at the 0-worker rate measured here, one free core each.',
  ]
  if r.get('input'):
    i = r['input']
    rows = ' '.join(
      f'{p["num_workers"]} workers: {p["examples_per_s"]} examples/s '
      f'(first batch {p["first_batch_s"]} s);'
      for p in i['pipeline']
    )
    lines += [
      '',
      f'Input, measured on this machine: `{i["command"]}`: '
      f'{rows} batches of {i["batch_size"]} crops of {i["crop_seconds"]} s '
      f'from `{i["corpus"]}`. {i["machine"]}.',
    ]
  lines += ['', *report.json_details(r)]
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--corpus', default='/tmp/debian_music/manifest.jsonl')
  ap.add_argument('--devices', type=int, default=8, help='fake CPU devices')
  ap.add_argument('--skip_memory', action='store_true', help='no compiles')
  ap.add_argument('--skip_input', action='store_true', help='no pipeline')
  ap.add_argument('--update_docs', action='store_true')
  ap.add_argument(
    '--reuse_json', help="an earlier run's JSON: recompute the projection"
  )
  ap.add_argument('--case', help='internal: one memory case (JSON)')
  args = ap.parse_args()
  if args.case:
    print(json.dumps(memory_case(json.loads(args.case))))
    return
  result = {'benchmark': 'sized_plan', **report.environment()}
  result['measured_by'] = report.command_line()
  if not args.reuse_json:
    result['flops'] = {d: flops(d) for d in ('bfloat16', 'float32')}
    print(json.dumps(result['flops']), file=sys.stderr)
  if not args.skip_memory and not args.reuse_json:
    result['memory'] = []
    for case in MEMORY_CASES:
      result['memory'].append(run_case(case, args.devices))
      print(json.dumps(result['memory'][-1]), file=sys.stderr)
  per_core = None
  if args.reuse_json:
    # Only the projection is recomputed from an earlier run's figures.
    with open(args.reuse_json, encoding='utf-8') as f:
      old = json.load(f)
    keep = ('flops', 'memory', 'input', 'measured_by')
    result.update({k: old[k] for k in keep if k in old})
  if 'input' in result:
    per_core = result['input']['pipeline'][0]['examples_per_s']
  elif not args.skip_input:
    workers = gin_workers('hardware/tpu_pod.gin')
    # v5p-128's per-host slice of the global batch: 128 / 16 hosts.
    result['input'] = input_rate(args.corpus, workers, 8)
    # 0 workers: the main process alone, about one core.
    per_core = result['input']['pipeline'][0]['examples_per_s']
  gflop = result['flops']['bfloat16']['gflop_per_example']
  result['projection'] = project(gflop, per_core)
  result['date'] = datetime.date.today().isoformat()
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('sized_plan', result, markdown)


if __name__ == '__main__':
  main()

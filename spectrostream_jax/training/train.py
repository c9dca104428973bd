r"""`spectrostream-train`: GAN training of SpectroStream.

    spectrostream-train --workdir=/tmp/quickstart \
        --gin_file=experiments/quickstart.gin --gin.train.num_steps=2000

Gin files live in the repository's gin/ folder (searched automatically)
and bind frozen configs; only `train` is configurable here. Bindings come
from `--gin_file`, `--gin_bindings='train.num_steps = 20'` and the
shorthand `--gin.train.num_steps=20`. The operative config is written to
WORKDIR/config.gin. A run resumes from WORKDIR/checkpoints by itself.
Several hosts: `--distributed` lets JAX find the cluster (TPU pods, Slurm,
...), or give --coordinator_address, --num_processes and --process_id.
Fine-tuning: `--init_from=MODEL_DIR` starts from a model directory and
`--trainable=decoder` freezes the rest (docs/finetune.md).

`--help` lists the flags a run needs; a missing gin file or a misspelt
binding is one line naming it, with the closest name gin knows. Ctrl-C
during the steps of a one-process run finishes the step, saves a
checkpoint (as SIGTERM does) and exits 130; a second Ctrl-C, or one
before the first step, exits 130 at once.

`train` reads top to bottom: mesh → data → shapes → shardings → init or
restore → jitted step → loop → cleanup.
"""

import collections
from collections.abc import Callable
import concurrent.futures
import contextlib
import dataclasses
import difflib
import functools
import inspect
import itertools
import logging as std_logging
import os
import pathlib
import re
import sys
import textwrap
import threading
import time
import tokenize
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import gin
from spectrostream_jax import commands
from spectrostream_jax import compile_cache
from spectrostream_jax import files
from spectrostream_jax import flops
from spectrostream_jax.data import pipeline
from spectrostream_jax.models import quantizer as rvq
from spectrostream_jax.training import checkpoint as checkpoint_lib
from spectrostream_jax.training import finetune
from spectrostream_jax.training import sharding
from spectrostream_jax.training import state as train_state
from spectrostream_jax.training import step as step_lib
from spectrostream_jax.training import train_logging
from spectrostream_jax.training import trainable as trainable_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.', required=True)
_GIN_FILES = flags.DEFINE_multi_string(
  'gin_file', [], 'Gin files, relative to the cwd or to gin/.'
)
_GIN_BINDINGS = flags.DEFINE_multi_string(
  'gin_bindings', [], "Gin bindings such as 'train.num_steps = 20'."
)
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  'Start jax.distributed with cluster auto-detection (TPU pod, Slurm, ...).',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (explicit multi-host).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process.')
_INIT_FROM = flags.DEFINE_string(
  'init_from',
  None,
  'Start from this model directory (train.init_from; docs/finetune.md).',
)
_TRAINABLE = flags.DEFINE_string(
  'trainable',
  None,
  "What learns, e.g. 'decoder' or 'encoder+decoder' (train.trainable).",
)
_COMPILE_CACHE = flags.DEFINE_string(
  'compile_cache',
  None,
  compile_cache.HELP[0].upper() + compile_cache.HELP[1:] + '.',
)
_QUIET = flags.DEFINE_bool(
  'quiet', False, 'Log warnings and errors only.', short_name='q'
)
# Handled in `run` before absl parses (--workdir is required); defined so
# that --helpfull lists it.
flags.DEFINE_bool('version', False, 'Print the version and exit.')

PROG = 'spectrostream-train'

# The package root: our own log lines come from anywhere under it.
PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1])
GIN_DIR = pathlib.Path(PACKAGE_DIR).parent / 'gin'


class Interrupted(Exception):  # noqa: N818 (not a failure)
  """Ctrl-C stopped the run; a checkpoint of `step` was saved first."""

  def __init__(self, step: int, directory: str):
    super().__init__(f'interrupted: checkpoint {step} saved in {directory}')
    self.step = step
    self.directory = directory


def train(
  workdir: str,
  num_steps: int,
  model: step_lib.StepConfig,
  data: pipeline.PipelineConfig,
  eval_data: pipeline.PipelineConfig | None,
  mesh: sharding.MeshConfig,
  checkpoint: checkpoint_lib.CheckpointConfig,
  log_every: int = 50,
  eval_every: int = 1000,
  eval_batches: int = 4,
  eval_kbps: tuple[float, ...] = (4.0, 8.0, 16.0),
  audio_examples: int = 2,
  log_grad_norms: bool = True,
  seed: int = 0,
  init_from: str | None = None,
  trainable: str = trainable_lib.ALL,
) -> train_state.TrainState:
  """Trains (or resumes) until `num_steps` updates; returns the state.

  Args:
    workdir: checkpoints/, tensorboard/ and config.gin go here.
    num_steps: total updates of the run, counting those before a resume.
    model: networks, losses and optimizers.
    data: training batches (global batch size over all processes).
    eval_data: the held-out set: its first `eval_batches` batches.
    mesh: device mesh and parameter sharding rules.
    checkpoint: save interval and retention.
    log_every: steps between scalar logs and progress lines.
    eval_every: steps between evals (0: none); the last step evaluates.
    eval_batches: held-out batches per eval.
    eval_kbps: bitrates of the eval (each a whole number of RVQ levels).
    audio_examples: held-out examples logged as audio and spectrograms.
    log_grad_norms: at each log step, also measure what each generator
      term contributes to the gradient at x̂ (`step.gradient_norms`, about
      half a step's compute).
    seed: parameters and training randomness.
    init_from: a model directory (an export, or Google's two files) whose
      weights start the run; ignored when the run resumes.
    trainable: the codec parameters that learn: 'all', or parameter paths
      joined by '+' such as 'decoder' (`trainable` module).
  """
  model = dataclasses.replace(model, trainable=trainable)
  codec = model.codec
  levels = [codec.levels_for_kbps(k) for k in eval_kbps]
  if eval_every and eval_data is None:
    raise ValueError('eval_every > 0 needs eval_data')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_atomic(
      os.path.join(workdir, 'config.gin'), gin.operative_config_str()
    )

  # ---------------------------------------------------------------- Mesh
  device_mesh = sharding.make_mesh(mesh)
  processes = jax.process_count()
  batch_sharding = sharding.batch_sharding(device_mesh)
  logging.info('mesh %s over %d processes', dict(device_mesh.shape), processes)

  # ---------------------------------------------------------------- Data
  for config in (data, eval_data) if eval_every else (data,):
    if config.batch_size % device_mesh.size:
      raise ValueError(
        f'batch size {config.batch_size} does not split over '
        f'{device_mesh.size} devices'
      )

  def global_audio(batch):
    audio = {'audio': batch['audio']}
    return pipeline.to_global_batch(audio, device_mesh, sharding.BATCH_AXES)

  train_iter = iter(pipeline.make_dataset(data))
  iterators = [train_iter]
  held_out = []
  if eval_every:
    eval_iter = iter(pipeline.make_dataset(eval_data))
    iterators.append(eval_iter)
    held_out = [
      global_audio(b) for b in itertools.islice(eval_iter, eval_batches)
    ]

  # ---------------------------------------------------------------- Shapes
  init = functools.partial(step_lib.init_state, model)
  abstract = jax.eval_shape(init, seed)
  crop = data.audio.crop_samples
  # Audio the codec reconstructs per step (the look-ahead is input only).
  audio_seconds = (
    data.batch_size
    * codec.output_samples(codec.num_embeddings(crop))
    / codec.sample_rate
  )
  batch_shape = {
    'audio': jax.ShapeDtypeStruct(
      (data.batch_size, crop, data.audio.num_channels),
      jnp.float32,
      sharding=batch_sharding,
    )
  }
  trainable_lib.check(abstract.params, trainable)
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  num_disc_params = sum(x.size for x in jax.tree.leaves(abstract.disc_params))
  logging.info(
    'codec %d parameters, discriminators %d; batch %d × %.3f s',
    num_params,
    num_disc_params,
    data.batch_size,
    crop / data.audio.sample_rate,
  )

  # ---------------------------------------------------------------- Shardings
  state_sharding = sharding.tree_shardings(device_mesh, abstract, mesh)
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    abstract,
    state_sharding,
  )

  # ---------------------------------------------------------------- Init
  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'), checkpoint
  )
  # Ctrl-C in the loop asks it to stop and save (`commands.deferred`);
  # several processes would have to agree on the step, so they stop at
  # once instead (and SIGTERM stops them together).
  stop = threading.Event()
  deferral = contextlib.ExitStack()
  # Closed on any exit: pending saves finish, the SIGTERM handler goes back.
  try:
    state, first_step, source = start_or_resume(
      ckpt,
      abstract,
      train_iter,
      lambda: jax.jit(init, out_shardings=state_sharding)(seed),
      model,
      init_from,
      rows_per_step=data.batch_size * codec.num_embeddings(crop),
    )
    record = run_record(model, data, source)

    # ---------------------------------------------------------------- Step
    programs = jit_programs(
      model, device_mesh, processes, state_sharding, levels, audio_examples
    )
    warmup_steps = model.warmup_steps
    # A replicated scalar: every process reads the same value, no collective.
    needs_codebooks = model.learns_codebooks and not bool(
      jax.device_get(state.codebooks.initialized)
    )
    warming = first_step < warmup_steps
    todo = {
      'train_step': (abstract, batch_shape),
      'warmup_step': (abstract, batch_shape) if warming else None,
      'init_codebooks': (abstract, batch_shape) if needs_codebooks else None,
      'gradient_norms': (abstract, batch_shape) if log_grad_norms else None,
      'warmup_norms': (
        (abstract, batch_shape) if log_grad_norms and warming else None
      ),
      'evaluate': (
        (abstract.ema_params, _shape(held_out[0])) if eval_every else None
      ),
    }
    result = compile_programs(programs, todo)
    compiled = result.programs
    for name, program in compiled.items():
      check_collective_order(program, f'the program {name}')
    check_fits(compiled, data.batch_size // device_mesh.size)
    memory = compiled['train_step'].memory_analysis()
    logging.info(
      'GAN step: %.4g GFLOP over %d devices (convolutions and products); '
      'per device: arguments %.1f MiB, outputs %.1f MiB, temporaries '
      '%.1f MiB',
      result.flops['train_step'] / 1e9,
      device_mesh.size,
      memory.argument_size_in_bytes / 2**20,
      memory.output_size_in_bytes / 2**20,
      memory.temp_size_in_bytes / 2**20,
    )
    if warmup_steps:
      logging.info(
        'steps 1-%d: reconstruction-only warm-up; k-means and the GAN from '
        'step %d',
        warmup_steps,
        warmup_steps + 1,
      )

    # ---------------------------------------------------------------- Loop
    writer = train_logging.Writer(os.path.join(workdir, 'tensorboard'))
    writer.scalars(
      first_step,
      {f'perf/compile_seconds/{k}': v for k, v in result.seconds.items()},
    )
    progress = train_logging.Progress(first_step, num_steps)
    skips = collections.Counter()
    skipped = 0
    if processes == 1:
      deferral.enter_context(commands.deferred(stop.set))
    for step in range(first_step + 1, num_steps + 1):
      batch = next(train_iter)
      skips.update(pipeline.skip_counts(batch))  # This process's share.
      batch = global_audio(batch)
      warmup = step <= warmup_steps
      if needs_codebooks and not warmup:
        state = compiled['init_codebooks'](state, batch)
        needs_codebooks = False
      logging_step = step % log_every == 0 or step in (
        first_step + 1,
        num_steps,
      )
      grad_norms = {}
      if logging_step and log_grad_norms:
        norms = 'warmup_norms' if warmup else 'gradient_norms'
        grad_norms = compiled[norms](state, batch)
      update_name = 'warmup_step' if warmup else 'train_step'
      state, metrics = compiled[update_name](state, batch)
      progress.update(step)

      if logging_step:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        grad_norms = jax.device_get(grad_norms)
        metrics.update({k: float(v) for k, v in grad_norms.items()})
        shown = ('g/mel', 'g/phase', 'g/adv', 'g/feat', 'd/loss', 'vq/commit')
        rate = progress.report(
          step, {k: metrics[k] for k in shown if k in metrics}
        )
        metrics['perf/steps_per_second'] = rate
        metrics['perf/audio_seconds_per_second'] = rate * audio_seconds
        metrics.update(
          _utilisation(result.flops[update_name], rate, codec.dtype)
        )
        metrics.update({f'data/skips/{r}': float(n) for r, n in skips.items()})
        if metrics['train/skipped'] > skipped:
          skipped = int(metrics['train/skipped'])
          logging.warning(
            'step %d: %d updates skipped so far (non-finite loss or gradient)',
            step,
            skipped,
          )
        writer.scalars(step, metrics)

      eval_metrics = None
      if eval_every and (step % eval_every == 0 or step == num_steps):
        eval_metrics = _evaluate(
          compiled['evaluate'],
          state.ema_params,
          held_out,
          eval_kbps,
          codec,
          writer,
          step,
        )
        progress.restart_clock()
      preempted = ckpt.reached_preemption(step)
      stopping = preempted or stop.is_set()
      ckpt.save(
        step,
        state,
        train_iter,
        record,
        metrics=eval_metrics,
        force=stopping or eval_metrics is not None or step == num_steps,
      )
      if preempted:
        logging.warning('stopping at step %d after a preemption notice', step)
      if stopping:
        break

    # ---------------------------------------------------------------- Cleanup
    progress.close()
    writer.close()
  finally:
    # A Ctrl-C while the last save finishes waits for it, too.
    ckpt.close()
    deferral.close()
  if stop.is_set():
    # Grain's worker processes stop and free their shared memory now,
    # rather than being killed with it still registered.
    for iterator in iterators:
      iterator.close()
    raise Interrupted(int(jax.device_get(state.step)), ckpt.directory)
  return state


def run_record(
  model: step_lib.StepConfig,
  data: pipeline.PipelineConfig,
  source: dict[str, str] | None,
) -> dict[str, Any]:
  """The `config` item of every checkpoint (read back by export).

  With the encoder and codebooks frozen, a fine-tune's exports make its
  source's codes: `codes_compatible_with` names them (docs/finetune.md).
  """
  shares_codes = source is not None and trainable_lib.freezes_codes(
    model.trainable
  )
  return {
    'gin': gin.operative_config_str(),
    'model': dataclasses.asdict(model),
    'data': repr(data),
    'init_from': source,
    'codes_compatible_with': source['codes_id'] if shares_codes else None,
  }


def start_or_resume(
  ckpt: checkpoint_lib.Checkpointer,
  abstract: train_state.TrainState,
  data_iterator: Any,
  fresh: Callable[[], train_state.TrainState],
  model: step_lib.StepConfig,
  init_from: str | None,
  rows_per_step: int,
) -> tuple[train_state.TrainState, int, dict[str, str] | None]:
  """(state, step, where the run started) from the newest checkpoint.

  Without one: `fresh()`, with `init_from`'s weights if given, at step 0.
  The start's record (`finetune.Source.record`, None from scratch) is the
  one the checkpoints carry, so a resumed fine-tune still knows its source.
  """
  saved = ckpt.latest_record()
  ran = saved and saved.get('model', {}).get('trainable', trainable_lib.ALL)
  if saved and ran != model.trainable:
    # The optimizer state has another structure: restoring cannot work.
    raise trainable_lib.SpecError(
      f'the run in {os.path.dirname(ckpt.directory)} trains {ran!r}; resume '
      f'it with the same trainable, not {model.trainable!r}'
    )
  restored = ckpt.restore(abstract, data_iterator)
  if restored is not None:
    state, step, saved = restored
    source = saved.get('init_from')
    if init_from:
      logging.warning(
        'resuming at step %d: init_from=%s is ignored (the run started '
        'from %s)',
        step,
        init_from,
        source['path'] if source else 'scratch',
      )
    return state, step, source
  state = fresh()
  if not init_from:
    return state, 0, None
  source = finetune.read_source(init_from, model.codec)
  state = finetune.start_from(
    state,
    source,
    rows_per_step,
    model.codec.quantizer,
    jax.tree.map(lambda x: x.sharding, abstract),
  )
  logging.info('starting from %s (model %s)', init_from, source.model_id[:12])
  if model.warmup_steps:
    logging.warning(
      'init_from with %d warm-up steps: they bypass the trained RVQ '
      '(fine-tunes set step.StepConfig.warmup_steps = 0)',
      model.warmup_steps,
    )
  return state, 0, source.record()


class Programs(NamedTuple):
  """The jitted programs of a run (not yet compiled)."""

  train_step: Any  # (state, batch) -> (state, metrics); state donated
  warmup_step: Any  # the same, reconstruction only (step.train_step)
  init_codebooks: Any  # (state, batch) -> state; before the first GAN step
  gradient_norms: Any  # (state, batch) -> metrics; diagnostics
  warmup_norms: Any  # the same during the warm-up
  evaluate: Any  # (ema params, batch) -> (means, references, recs, counts)


def jit_programs(
  model: step_lib.StepConfig,
  mesh: jax.sharding.Mesh,
  processes: int,
  state_sharding: Any,
  levels: list[int],
  audio_examples: int,
) -> Programs:
  """The run's programs with their shardings.

  Batches arrive as global arrays assembled from per-process slices;
  every program first puts them in example order.
  """
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)

  def in_order(batch):
    audio = sharding.example_order(batch['audio'], processes)
    return {'audio': jax.lax.with_sharding_constraint(audio, batch_sharding)}

  def update(state, batch, warmup=False):
    return step_lib.train_step(model, state, in_order(batch), mesh, warmup)

  def init_codebooks(state, batch):
    return step_lib.init_codebooks(model, state, in_order(batch), mesh)

  def norms(state, batch, warmup=False):
    return step_lib.gradient_norms(model, state, in_order(batch), mesh, warmup)

  def evaluate(params, batch):
    wav = in_order(batch)['audio']
    metrics, recs, counts = step_lib.evaluate(model, params, wav, levels, mesh)
    means = {k: jnp.mean(v) for k, v in metrics.items()}
    return means, wav[:audio_examples], recs[:, :audio_examples], counts

  def step_program(warmup):
    return jax.jit(
      functools.partial(update, warmup=warmup),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
    )

  def norms_program(warmup):
    return jax.jit(
      functools.partial(norms, warmup=warmup),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=replicated,
    )

  return Programs(
    train_step=step_program(False),
    warmup_step=step_program(True),
    init_codebooks=jax.jit(
      init_codebooks,
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=state_sharding,
      donate_argnums=(0,),
    ),
    gradient_norms=norms_program(False),
    warmup_norms=norms_program(True),
    evaluate=jax.jit(
      evaluate,
      in_shardings=(state_sharding.ema_params, {'audio': batch_sharding}),
      out_shardings=replicated,
    ),
  )


def check_collective_order(compiled: Any, what: str) -> None:
  """Refuses a program whose collectives could run out of order.

  On several CPU processes a collective inside a loop or a conditional
  is not ordered against the others and aborts the run at random
  (docs/training.md, "Collectives and the order of programs").
  """
  if jax.process_count() == 1 or jax.default_backend() != 'cpu':
    return
  nested = sharding.nested_collectives(compiled.as_text())
  if nested:
    raise RuntimeError(
      f'{what} has collectives inside loops or conditionals, which CPU '
      f'processes may run in different orders: {", ".join(nested[:5])}'
    )


def _shape(batch: dict[str, jax.Array]) -> dict[str, jax.ShapeDtypeStruct]:
  return {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
    for k, v in batch.items()
  }


class Compiled(NamedTuple):
  """A run's compiled programs, by name, with what they cost."""

  programs: dict[str, Any]
  seconds: dict[str, float]  # Compile time of each.
  flops: dict[str, float]  # Global FLOPs of one call (`flops.of_jaxpr`).


def compile_programs(
  programs: Programs, todo: dict[str, tuple[Any, ...] | None]
) -> Compiled:
  """Compiles the programs a run needs, given their abstract arguments.

  Ahead of the first step, so that each one's compile time is logged and
  a step that cannot fit is refused before it runs (`check_fits`); in
  parallel threads (XLA compiles one program on about one core), after
  tracing them one by one. With the persistent cache (`compile_cache`)
  a warm start loads them instead. The FLOPs come from the traced
  jaxprs, so they count the convolutions on every backend (`flops`).
  """
  traced = {
    name: getattr(programs, name).trace(*args)
    for name, args in todo.items()
    if args is not None
  }
  lowered = {name: t.lower() for name, t in traced.items()}

  def compile_one(name):
    start = time.perf_counter()
    program = lowered[name].compile()
    seconds = time.perf_counter() - start
    logging.info('compiled %s in %.1f s', name, seconds)
    return program, seconds

  start = time.perf_counter()
  workers = max(1, min(len(lowered), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    done = dict(zip(lowered, pool.map(compile_one, lowered), strict=True))
  logging.info(
    '%d programs compiled in %.1f s (%d at a time)',
    len(done),
    time.perf_counter() - start,
    workers,
  )
  return Compiled(
    {name: program for name, (program, _) in done.items()},
    {name: seconds for name, (_, seconds) in done.items()},
    {name: flops.of_jaxpr(t.jaxpr) for name, t in traced.items()},
  )


def _utilisation(step_flops: float, rate: float, dtype: str) -> dict:
  """TFLOP/s of the steps, and MFU on a chip in `flops.PEAKS`."""
  out = {'perf/tflops_per_second': step_flops * rate / 1e12}
  if rate > 0:
    mfu = flops.mfu(step_flops, 1 / rate, dtype)
    if mfu is not None:
      out['perf/mfu'] = mfu
  return out


class DoesNotFitError(ValueError):
  """A program of the run needs more memory than a device has."""


def device_memory() -> tuple[int, str] | None:
  """(bytes a program may use on one local device, what that figure is).

  An accelerator's allocator limit; on CPU, whose devices share the
  host's memory, the memory still available (the state is already in it)
  split over the local devices. None where neither is known.
  """
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.device_kind} memory limit'
  try:
    with open('/proc/meminfo') as f:
      info = dict(line.split(':', 1) for line in f)
  except OSError:
    return None
  available = int(info['MemAvailable'].split()[0]) * 1024
  return available // jax.local_device_count(), 'available host memory'


def peak_bytes(compiled: Any, resident: bool) -> int:
  """A program's peak memory per device, from its compiled analysis.

  `resident`: its arguments are already in memory (on CPU, where the
  available figure excludes them), so only outputs and temporaries count.
  """
  m = compiled.memory_analysis()
  outputs = m.output_size_in_bytes - m.alias_size_in_bytes
  need = outputs + m.temp_size_in_bytes
  return need if resident else need + m.argument_size_in_bytes


def _size(n: float) -> str:
  return f'{n / 2**30:.1f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def check_fits(
  compiled: dict[str, Any],
  per_device_batch: int,
  memory: tuple[int, str] | None = None,
) -> None:
  """Raises DoesNotFitError, naming the largest batch that would, if a program
  of the run needs more memory than a device has.

  The estimate of the largest batch scales the temporaries, which grow
  with the batch, and keeps the rest (state, outputs) fixed.
  """
  memory = memory or device_memory()
  if memory is None:
    return
  limit, what = memory
  resident = what == 'available host memory'
  name, program = max(
    compiled.items(), key=lambda kv: peak_bytes(kv[1], resident)
  )
  need = peak_bytes(program, resident)
  if need <= limit:
    return
  temp = program.memory_analysis().temp_size_in_bytes
  per_example = max(temp / per_device_batch, 1.0)
  largest = max(int((limit - (need - temp)) // per_example), 0)
  raise DoesNotFitError(
    f'{name} needs {_size(need)} per device at a per-device batch of '
    f'{per_device_batch}, more than the {_size(limit)} of {what}; about '
    f'{largest} examples per device fit (set '
    'pipeline.PipelineConfig.batch_size to that times the device count)'
  )


def _evaluate(eval_step, params, held_out, kbps, codec, writer, step):
  """Runs the held-out set; logs scalars, codebook use, audio, spectrograms."""
  totals, counts = {}, 0.0
  for i, batch in enumerate(held_out):
    means, refs, recs, batch_counts = jax.device_get(eval_step(params, batch))
    counts = counts + batch_counts
    for name, value in means.items():
      totals[name] = totals.get(name, 0.0) + float(value) / len(held_out)
    if i == 0:
      _log_examples(writer, step, refs, recs, kbps, codec.sample_rate)
  levels = [codec.levels_for_kbps(k) for k in kbps]
  metrics = {}
  for name in ('mel_distance', 'si_sdr'):
    values = [totals[f'{name}/{n}'] for n in levels]
    metrics.update(
      {f'eval/{name}/{k:g}kbps': v for k, v in zip(kbps, values, strict=True)}
    )
    metrics[f'eval/{name}'] = float(np.mean(values))
  use = rvq.codebook_metrics(np.asarray(counts))
  for name, values in use.items():
    metrics.update(
      {f'eval/{name}/L{i:02d}': float(v) for i, v in enumerate(values)}
    )
  writer.scalars(step, metrics)
  writer.flush()
  # The log line: every bitrate's figures, and level 1's codebook use.
  shown = {k: v for k, v in metrics.items() if '/L' not in k}
  shown.update(
    {k: metrics[k] for k in ('eval/usage/L00', 'eval/perplexity/L00')}
  )
  logging.info(
    'eval at step %d: %s',
    step,
    ', '.join(f'{k} {v:.4g}' for k, v in shown.items()),
  )
  return metrics


def _log_examples(writer, step, refs, recs, kbps, sample_rate):
  for i, ref in enumerate(refs):
    clips = {'reference': ref[: recs.shape[2]]}
    clips.update(
      {f'{k:g}kbps': rec[i] for k, rec in zip(kbps, recs, strict=True)}
    )
    for name, wav in clips.items():
      writer.audio(step, f'audio/{i}/{name}', wav, sample_rate)
      writer.image(
        step,
        f'spectrogram/{i}/{name}',
        train_logging.spectrogram_image(wav, sample_rate),
      )


def _start_processes() -> None:
  """jax.distributed, when asked for; must precede every other JAX call."""
  if _COORDINATOR.value:
    jax.distributed.initialize(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def _quiet(record: std_logging.LogRecord) -> bool:
  """At the default verbosity: our info lines and everyone's warnings."""
  return (
    record.levelno >= std_logging.WARNING
    or record.pathname.startswith(PACKAGE_DIR)
    or logging.get_verbosity() > logging.INFO
  )


def _not_a_search_miss(record: std_logging.LogRecord) -> bool:
  """gin logs an error for each search path that lacks a file it finds."""
  return record.module != 'resource_reader'


def parse_gin(files: list[str], bindings: list[str]) -> None:
  """Parses gin files (relative to the cwd or gin/) and bindings."""
  gin.add_config_file_search_path(str(GIN_DIR))
  root = std_logging.getLogger()
  root.addFilter(_not_a_search_miss)
  try:
    gin.parse_config_files_and_bindings(files, bindings)
  finally:
    root.removeFilter(_not_a_search_miss)


class ConfigError(ValueError):
  """A gin file or binding that cannot give `train` its arguments."""


def gin_files() -> list[str]:
  """The gin files of the repository, as --gin_file names them."""
  return sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob('*.gin'))


def _closest(word: str, candidates) -> str:
  """' (did you mean X?)' for the closest candidate, or ''."""
  found = difflib.get_close_matches(word, sorted(set(candidates)), n=1)
  return f'; did you mean {found[0]}?' if found else ''


def _selectors() -> set[str]:
  """Every way of naming a configurable gin knows: each dotted suffix."""
  from gin import config as gin_config  # Its registry has no public API.

  names = set()
  for key, _ in gin_config._REGISTRY.items():
    if key.startswith('gin.'):
      continue
    parts = key.split('.')
    names.update('.'.join(parts[i:]) for i in range(len(parts)))
  return names


def _parameters(selector: str) -> list[str]:
  from gin import config as gin_config

  try:
    found = gin_config._REGISTRY.get_match(selector)
    return list(inspect.signature(found.wrapped).parameters)
  except (KeyError, TypeError, ValueError, AttributeError):
    return []


_NO_CONFIGURABLE = r"No configurable matching (?:reference )?'@?([^'(]+)"
_IN_CALL = r"In call to configurable '([^']+)'"
_NO_PARAMETER = r"Configurable '(.+)' doesn't have a parameter named '(.+)'"


def gin_error(error: BaseException) -> str:
  """One line for a gin failure: what is wrong, where, the closest name."""
  lines = [line.strip() for line in str(error).strip().splitlines()]
  first = lines[0] if lines else type(error).__name__
  where = ''
  if len(lines) > 1 and lines[1].startswith('In '):
    where = f' ({lines[1][3:]})'
  if m := re.match(r'Unable to open file: (.*)\. Searched config paths', first):
    name = m[1]
    return (
      f'no gin file {name} (looked in the current directory and {GIN_DIR})'
      + _closest(name, gin_files())
    )
  if m := re.match(_NO_CONFIGURABLE, first):
    scope, _, name = m[1].rpartition('/')
    hint = _closest(name, _selectors())
    if hint and scope:
      hint = hint.replace('mean ', f'mean {scope}/', 1)
    return f'gin knows no configurable {m[1]!r}{where}{hint}'
  if m := re.match(_NO_PARAMETER, first):
    return f'{m[1]} has no parameter {m[2]!r}{where}' + _closest(
      m[2], _parameters(m[1])
    )
  if isinstance(error, SyntaxError) and not isinstance(error, ConfigError):
    location = getattr(error, 'location', None) or error.args[-1]
    line = getattr(location, 'line_num', None)
    name = getattr(location, 'filename', None) or 'bindings'
    if line is not None:
      return f'gin cannot parse {name} line {line}: {first}'
  if isinstance(error, tokenize.TokenError):
    return f'gin cannot parse the bindings: {error.args[0]}'
  if m := re.match(_IN_CALL, lines[1] if len(lines) > 1 else ''):
    where = f' (in {m[1]})'
  return f'{first}{where}'


def check_config() -> None:
  """Builds `train`'s bound arguments once, so a bad binding fails now.

  Raises ConfigError when a required argument is unbound (no gin file);
  the configs' own checks raise ValueError, wrapped by gin.
  """
  unbound = []
  for name, param in inspect.signature(train).parameters.items():
    try:
      value = gin.query_parameter(f'train.{name}')
    except ValueError:
      if name != 'workdir' and param.default is inspect.Parameter.empty:
        unbound.append(f'train.{name}')
      continue
    if isinstance(value, gin.config.ConfigurableReference):
      value.scoped_configurable_fn()
  if unbound:
    raise ConfigError(
      f'nothing binds {", ".join(unbound)}: give a --gin_file such as '
      'experiments/quickstart.gin (spectrostream-train --help)'
    )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet)
  compile_cache.enable(_COMPILE_CACHE.value)
  if _QUIET.value:
    logging.set_verbosity(logging.WARNING)
  _start_processes()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  configured_train = gin.configurable(train)
  bindings = list(_GIN_BINDINGS.value)
  if _INIT_FROM.value is not None:
    bindings.append(f'train.init_from = {_INIT_FROM.value!r}')
  if _TRAINABLE.value is not None:
    bindings.append(f'train.trainable = {_TRAINABLE.value!r}')
  try:
    parse_gin(_GIN_FILES.value, bindings)
    check_config()
  # Parsing reads nothing but the user's files and bindings: whatever it
  # raises (OSError, ValueError, SyntaxError, tokenize's TokenError, an
  # ImportError of a gin import line) is about them.
  except Exception as e:
    sys.exit(f'{PROG}: error: {gin_error(e)}')
  try:
    state = configured_train(_WORKDIR.value)
  except Interrupted as e:
    commands.finish_interrupted(
      PROG,
      f'interrupted: checkpoint {e.step} saved in {e.directory}; the same '
      'command resumes',
    )
  except (finetune.SourceError, trainable_lib.SpecError, DoesNotFitError) as e:
    # gin appends a line naming the configurable; ours is the first.
    sys.exit(f'{PROG}: error: {files.first_line(e)}')
  logging.info(
    'done: step %d, %d updates skipped',
    int(state.step),
    int(state.skipped),
  )


def usage() -> str:
  """`--help`: the flags a run needs (absl's `--helpfull` lists all)."""
  experiments = textwrap.fill(
    ', '.join(
      name.removeprefix('experiments/')
      for name in gin_files()
      if name.startswith('experiments/')
    ),
    width=72,
    initial_indent=' ' * 25,
    subsequent_indent=' ' * 25,
  )
  return f"""\
usage: {PROG} --workdir=DIR --gin_file=FILE [--gin.X=VALUE ...]

Trains a SpectroStream codec, or resumes the run in DIR.

  --workdir=DIR          the run: checkpoints/, tensorboard/, config.gin;
                         a run resumes from its newest checkpoint by itself
  --gin_file=FILE        gin config, relative to the current directory or
                         to gin/ (repeatable); in gin/experiments/:
{experiments}
  --gin.SELECTOR=VALUE   one binding, e.g. --gin.train.num_steps=2000
  --gin_bindings='SELECTOR = VALUE'
                         the same in gin's syntax (repeatable)
  --init_from=MODEL_DIR  start from a model directory (fine-tuning)
  --compile_cache=DIR    persistent XLA compilation cache, or off (default:
                         $SPECTROSTREAM_COMPILE_CACHE or
                         ~/.cache/spectrostream_jax/xla)
  --trainable=PARTS      what learns, e.g. decoder or encoder+decoder
  --distributed          several hosts: JAX finds the cluster (TPU pod,
                         Slurm); or --coordinator_address, --num_processes,
                         --process_id
  -q, --quiet            log warnings and errors only
  --version              print the version and exit
  --helpfull             every flag, absl's and JAX's included

Ctrl-C saves a checkpoint after the current step and exits 130 (a second
Ctrl-C exits at once). docs/training.md is the guide; docs/finetune.md
covers --init_from and --trainable.
"""


def gin_shorthand(argv: list[str]) -> list[str]:
  """--gin.SELECTOR=VALUE -> --gin_bindings='SELECTOR = VALUE'."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      selector, sep, value = arg[len('--gin.') :].partition('=')
      if not sep:
        raise app.UsageError(f'{arg}: write --gin.SELECTOR=VALUE')
      arg = f'--gin_bindings={selector} = {value}'
    out.append(arg)
  return out


def run() -> None:
  """Console entry point."""
  # Gin files import this module by name; under `python -m` it is __main__
  # and must not be imported (and its flags defined) a second time. (The
  # operative config then says `__main__.train`.)
  sys.modules.setdefault(
    'spectrostream_jax.training.train', sys.modules[__name__]
  )
  args = sys.argv[1:]
  # Before absl parses: --workdir is required, and absl's --help shows
  # only this module's docstring.
  if '--version' in args:
    print(commands.version(PROG))
    return
  if any(arg in ('-h', '--help', '-?', '--helpshort') for arg in args):
    print(usage(), end='')
    return
  try:
    argv = gin_shorthand(sys.argv)
  except app.UsageError as e:
    sys.exit(f'{PROG}: error: {e}')
  jax.config.config_with_absl()
  app.run(main, argv=argv)


if __name__ == '__main__':
  run()

"""`spectrostream-train` end to end, in subprocesses.

The quickstart experiment shrunk further (a 2-scale discriminator, 8
clips of 3 + 1 frames, 4 steps: 2 of warm-up, k-means, 2 GAN steps) runs
on 1 device, on 8 devices and on 2 processes × 2 devices
(jax.distributed on 127.0.0.1): all three end with the same parameters.
A run killed with SIGKILL and resumed ends with exactly the parameters of
the uninterrupted run; SIGTERM saves and exits 0. Runs share a persistent
compilation cache and compile with LLVM optimisation off (faster to
compile; rounding differs, not the math).
"""

import dataclasses
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

import gin
from spectrostream_jax import losses
from spectrostream_jax.data import pipeline
from spectrostream_jax.models import codec
from spectrostream_jax.training import step
from spectrostream_jax.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
ARGS = (
  '--gin_file=experiments/quickstart.gin',
  f'--gin.train.num_steps={STEPS}',
  '--gin.train.log_every=1',
  '--gin.train.eval_every=0',
  '--gin.checkpoint.CheckpointConfig.every=2',
  '--gin.discriminator.DiscriminatorConfig.windows=(64, 128)',
  '--gin.discriminator.DiscriminatorConfig.base_channels=4',
  '--gin.discriminator.DiscriminatorConfig.channel_multipliers=(1, 2)',
  '--gin.discriminator.DiscriminatorConfig.strides=((1, 2), (1, 2))',
  '--gin.pipeline.PipelineConfig.batch_size=8',
  '--gin.held_out/pipeline.PipelineConfig.batch_size=8',
  '--gin.transforms.AudioConfig.crop_samples=7680',
  # Steps 1-2 reconstruction only, k-means on their 64 embeddings and step
  # 3's 32, steps 3-4 GAN.
  '--gin.step.StepConfig.warmup_steps=2',
  '--gin.quantizer.QuantizerConfig.kmeans_buffer=64',
  # Well-conditioned k-means: 96 embeddings for 8 codes, not 64.
  '--gin.quantizer.QuantizerConfig.codebook_size=8',
  # The gradient-share diagnostics: in the 8-device run only.
  '--gin.train.log_grad_norms=False',
  # Adam's first steps move a parameter by lr · g / (|g| + eps): an element
  # whose gradient is zero up to rounding (which is ~1e-5 next to a
  # gradient norm of ~3e3, so it differs between device layouts, measured
  # 1.5e-6 vs 1.2e-5 for one kernel element) would step by up to ±lr.
  # eps = 1e-3 keeps such steps near lr / 100, far below the tolerance.
  '--gin.optim.OptimizerConfig.eps=1e-3',
  # 2, 4 and 8 levels of 3 bits.
  '--gin.train.eval_kbps=(0.15, 0.3, 0.6)',
)
TIMEOUT = 420
# Adam moves a parameter by up to lr = 1e-3 per step, 4e-3 in the run:
# codec parameters agree to 1 % of that (reduction order differs with
# devices; measured: < 1e-5). The discriminators' hinge loss has a kink at
# logits ±1, where rounding switches a term on or off: 5 % (measured:
# 1.2e-4).
# 1.2e-4). EMA codebooks are means of a few embeddings each, which carry
# the encoder's rounding: 5 % as well (measured: 5.9e-5).
ATOL = 4e-5
DISC_ATOL = 2e-4
CODEBOOK_ATOL = 2e-4
# Logged losses agree to `rel` between device layouts. The commitment is
# the small residual left after the nearest codes, and feature matching a
# mean of ratios: rounding moves them ~1e-4 relative by step 4 (measured
# 9e-5 and 2e-5).
LOSSES = {
  'g/total': 1e-5,
  'g/mel': 1e-5,
  'g/phase': 1e-5,
  'g/wav': 1e-5,
  'g/feat': 1e-4,
  'd/loss': 1e-5,
  'vq/commit': 1e-3,
}


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """One compilation cache for the session, shared by pytest-xdist workers."""
  base = tmp_path_factory.getbasetemp()
  if 'PYTEST_XDIST_WORKER' in os.environ:
    base = base.parent
  path = base / 'train_xla_cache'
  path.mkdir(exist_ok=True)
  return path


def start(workdir, cache, devices=8, extra=(), process=None, log=None):
  """A training process; `process` = (coordinator, count, id)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=(
      f'--xla_force_host_platform_device_count={devices} '
      '--xla_backend_optimization_level=0'
    ),
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  cmd = [
    str(pathlib.Path(sys.executable).with_name('spectrostream-train')),
    f'--workdir={workdir}',
    *ARGS,
    *extra,
  ]
  if process:
    coordinator, count, index = process
    cmd += [
      f'--coordinator_address={coordinator}',
      f'--num_processes={count}',
      f'--process_id={index}',
    ]
  log = pathlib.Path(log or pathlib.Path(workdir).with_suffix('.log'))
  with log.open('w') as out:
    proc = subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
    )
  proc.log = log
  return proc


def finish(proc) -> str:
  """Waits for a run; its output. Fails unless it exited 0."""
  rc = proc.wait(timeout=TIMEOUT)
  output = proc.log.read_text()
  assert rc == 0, output[-3000:]
  return output


def steps(workdir) -> list[int]:
  folder = pathlib.Path(workdir, 'checkpoints')
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def load_state(workdir, step: int) -> dict:
  path = pathlib.Path(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(
    path, args=ocp.args.PyTreeRestore(restore_args=args)
  )


def events(workdir) -> dict[str, dict[int, float | None]]:
  """{tag: {step: scalar, or None for audio and images}} of a run's events.

  Reads the TFRecord framing of the event files directly (no TensorFlow).
  """
  found = {}
  for path in pathlib.Path(workdir, 'tensorboard').iterdir():
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      for v in event.summary.value:
        scalar = v.simple_value if v.HasField('simple_value') else None
        found.setdefault(v.tag, {})[event.step] = scalar
      i += 16 + n
  return found


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def assert_params_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.slow
def test_same_numbers_on_1_and_8_devices_and_2_processes(tmp_path, cache):
  """Also: the 8-device run's checkpoints, events and operative config."""
  eight = start(
    tmp_path / 'eight',
    cache,
    extra=['--gin.train.eval_every=4', '--gin.train.log_grad_norms=True'],
  )
  log = finish(eight)
  one = start(tmp_path / 'one', cache, devices=1)
  coordinator = f'127.0.0.1:{free_port()}'
  two = [
    start(
      tmp_path / 'two',
      cache,
      devices=2,
      process=(coordinator, 2, i),
      log=tmp_path / f'two_{i}.log',
    )
    for i in range(2)
  ]
  for proc in (one, *two):
    finish(proc)

  reference = load_state(tmp_path / 'eight', STEPS)
  logged = events(tmp_path / 'eight')
  for other in ('one', 'two'):
    other_logged = events(tmp_path / other)
    for tag, rel in LOSSES.items():
      assert sorted(other_logged[tag]) == sorted(logged[tag]), tag
      for i, value in other_logged[tag].items():
        assert value == pytest.approx(logged[tag][i], rel=rel), (tag, i)
    state = load_state(tmp_path / other, STEPS)
    assert int(state['step']) == STEPS
    for name in ('params', 'ema_params'):
      ours, theirs = dict(state[name]), dict(reference[name])
      assert_params_close(
        ours.pop('quantizer'), theirs.pop('quantizer'), 1e-3, CODEBOOK_ATOL
      )
      assert_params_close(ours, theirs, 1e-3, ATOL)
    assert_params_close(
      state['disc_params'], reference['disc_params'], 1e-3, DISC_ATOL
    )

  # Reconstruction terms at every step, the GAN's from step 3.
  assert sorted(logged['g/mel']) == [1, 2, 3, 4]
  assert sorted(logged['g/wav']) == [1, 2, 3, 4]
  assert sorted(logged['d/loss']) == [3, 4]
  assert sorted(logged['vq/commit']) == [3, 4]
  assert sorted(logged['g/share/mel']) == [1, 2, 3, 4]
  assert sorted(logged['g/share/feat']) == [3, 4]
  workdir = tmp_path / 'eight'
  assert steps(workdir) == [2, 4]
  operative = (workdir / 'config.gin').read_text()
  assert f'train_script.train.num_steps = {STEPS}' in operative
  tags = logged.keys()
  for tag in (
    'g/mel',
    'g/adv',
    'g/feat',
    'd/loss',
    'g/grad_norm',
    'g/lr',
    'vq/usage/L07',
    'vq/perplexity/L00',
    'vq/restarts/L00',
    'vq/active/L07',
    'g/grad/phase',
    'g/grad/adv',
    'eval/usage/L00',
    'eval/perplexity/L07',
    'perf/steps_per_second',
    'perf/audio_seconds_per_second',
    'eval/mel_distance/0.6kbps',
    'eval/si_sdr/0.15kbps',
    'audio/0/reference',
    'audio/1/0.3kbps',
    'spectrogram/0/0.6kbps',
  ):
    assert tag in tags, tag
  assert f'step {STEPS}/{STEPS}' in log
  assert 'eval at step 4' in log


@pytest.mark.slow
def test_resume_after_kill_matches_the_uninterrupted_run(tmp_path, cache):
  every_step = ['--gin.checkpoint.CheckpointConfig.every=1']
  finish(start(tmp_path / 'reference', cache))
  workdir = tmp_path / 'killed'
  proc = start(workdir, cache, extra=every_step)
  deadline = time.time() + TIMEOUT
  while not (workdir / 'checkpoints' / '1').exists():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.02)
  proc.kill()
  proc.wait()
  before = steps(workdir)
  assert before and before[-1] < STEPS, before
  log = finish(start(workdir, cache, extra=every_step))
  assert f'restored checkpoint {before[-1]}' in log
  resumed = load_state(workdir, STEPS)
  reference = load_state(tmp_path / 'reference', STEPS)
  for name in ('params', 'disc_params', 'opt_state', 'ema_params'):
    for x, y in zip(
      jax.tree.leaves(resumed[name]),
      jax.tree.leaves(reference[name]),
      strict=True,
    ):
      np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.slow
def test_sigterm_saves_and_exits_0(cache, tmp_path):
  workdir = tmp_path / 'sigterm'
  proc = start(
    workdir,
    cache,
    extra=[
      '--gin.train.num_steps=1000',
      '--gin.checkpoint.CheckpointConfig.every=1000',
    ],
  )
  deadline = time.time() + TIMEOUT
  while 'step 2/1000' not in proc.log.read_text():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output = finish(proc)
  assert 'SIGTERM' in output
  (saved,) = steps(workdir)
  assert 2 <= saved < 1000
  assert f'stopping at step {saved}' in output


@pytest.mark.parametrize(
  'experiment',
  sorted(p.name for p in (REPO / 'gin' / 'experiments').glob('*.gin')),
)
def test_every_experiment_takes_num_steps(experiment):
  gin.clear_config()
  try:
    train.parse_gin([f'experiments/{experiment}'], ['train.num_steps = 20'])
    assert gin.query_parameter('train.num_steps') == 20
    built = {
      name: gin.query_parameter(f'train.{name}').scoped_configurable_fn()
      for name in ('model', 'data', 'eval_data', 'mesh', 'checkpoint')
    }
    assert isinstance(built['model'], step.StepConfig)
    assert isinstance(built['eval_data'], pipeline.PipelineConfig)
    assert built['data'].seed != built['eval_data'].seed
    # Every eval bitrate is a whole number of the model's levels.
    for kbps in gin.query_parameter('train.eval_kbps'):
      built['model'].codec.levels_for_kbps(kbps)
  finally:
    gin.clear_config()


def same_network(config: codec.CodecConfig, preset: codec.CodecConfig):
  """The preset's network and codebook shapes (recipes set how the RVQ
  trains)."""
  q, p = config.quantizer, preset.quantizer
  shape = ('num_levels', 'codebook_size', 'dim')
  return dataclasses.replace(config, quantizer=p) == preset and all(
    getattr(q, f) == getattr(p, f) for f in shape
  )


@pytest.mark.parametrize(
  'experiment,preset',
  [
    ('quickstart', codec.tiny()),
    ('production_debian', codec.production()),
    ('small_debian', codec.small()),
  ],
)
def test_experiment_models_and_recipe(experiment, preset):
  gin.clear_config()
  try:
    train.parse_gin([f'experiments/{experiment}.gin'], [])
    model = gin.query_parameter('train.model').scoped_configurable_fn()
    assert same_network(model.codec, preset)
    # The default recipe (recipes/default.gin), two learning rates, a
    # warm-up that gives k-means data.
    assert model.loss == losses.LossConfig()
    assert model.codec.quantizer.bypass_prob == 0.25
    assert model.warmup_steps > 0
    for name in ('generator_optimizer', 'discriminator_optimizer'):
      assert (
        gin.query_parameter(
          f'{name.split("_")[0]}/optim.OptimizerConfig.learning_rate'
        )
        == getattr(model, name).learning_rate
      )
    if experiment == 'small_debian':
      assert model.discriminator.base_channels == 8
      assert model.discriminator_optimizer.learning_rate == 2e-4
    gin.clear_config()
    train.parse_gin(
      [f'experiments/{experiment}.gin', 'recipes/soundstream.gin'], []
    )
    model = gin.query_parameter('train.model').scoped_configurable_fn()
    assert model.loss.mel_form == 'soundstream'
    assert model.loss.phase_weight == model.loss.wav_weight == 0.0
    assert model.warmup_steps == 0
  finally:
    gin.clear_config()


def test_gin_shorthand():
  assert train.gin_shorthand(
    ['prog', '--gin.train.num_steps=20', '--workdir=/x', "--gin.A.b='c=d'"]
  ) == [
    'prog',
    '--gin_bindings=train.num_steps = 20',
    '--workdir=/x',
    "--gin_bindings=A.b = 'c=d'",
  ]

"""`spectrostream-train` as a user meets it: --help, --version, gin
mistakes and Ctrl-C, each through the console entry point pyproject names.
"""

import os
import pathlib
import signal
import subprocess
import time

from console_scripts import command
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = '--gin_file=experiments/quickstart.gin'


def env() -> dict[str, str]:
  return dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
  )


def train(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  return subprocess.run(
    [*command('spectrostream-train'), *args],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_version():
  done = train('--version')
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith('spectrostream-train (spectrostream_jax ')


def test_help_is_short_and_names_the_flags_a_run_needs():
  done = train('--help')
  assert done.returncode == 0, done.stderr
  text = done.stdout
  for flag in (
    '--workdir',
    '--gin_file',
    '--gin.',
    '--gin_bindings',
    '--init_from',
    '--trainable',
    '--version',
    '--helpfull',
    'quickstart.gin',
    'docs/training.md',
  ):
    assert flag in text, flag
  assert len(text.splitlines()) < 40


@pytest.mark.parametrize(
  'args,names',
  [
    (
      ['--gin_file=experiments/quickstrat.gin'],
      ['no gin file experiments/quickstrat.gin', 'experiments/quickstart.gin'],
    ),
    (
      [QUICKSTART, '--gin.train.num_stepz=3'],
      ["no parameter 'num_stepz'", 'did you mean num_steps?'],
    ),
    (
      [QUICKSTART, '--gin.trian.num_steps=3'],
      ["no configurable 'trian'", 'did you mean train?'],
    ),
    (
      [QUICKSTART, '--gin_bindings=step.StepConfig.warmup_stepz = 1'],
      ["no parameter 'warmup_stepz'", 'did you mean warmup_steps?'],
    ),
    ([], ['nothing binds train.num_steps', '--gin_file']),
    (
      [QUICKSTART, "--gin.checkpoint.CheckpointConfig.best_mode='mn'"],
      ["best_mode 'mn' not in", 'CheckpointConfig'],
    ),
  ],
)
def test_a_gin_mistake_is_one_line_naming_it(tmp_path, args, names):
  done = train(f'--workdir={tmp_path / "run"}', *args)
  assert done.returncode == 1
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith('spectrostream-train: error: ')
  for name in names:
    assert name in lines[0]
  assert not (tmp_path / 'run').exists()


# The quickstart made tiny (tests/test_train.py's settings): steps take
# well under a second, so the run is stepping a few seconds after start.
TINY = (
  QUICKSTART,
  '--gin.train.num_steps=100000',
  '--gin.train.log_every=1',
  '--gin.train.eval_every=0',
  '--gin.train.log_grad_norms=False',
  '--gin.checkpoint.CheckpointConfig.every=100000',
  '--gin.discriminator.DiscriminatorConfig.windows=(64, 128)',
  '--gin.discriminator.DiscriminatorConfig.base_channels=4',
  '--gin.discriminator.DiscriminatorConfig.channel_multipliers=(1, 2)',
  '--gin.discriminator.DiscriminatorConfig.strides=((1, 2), (1, 2))',
  '--gin.pipeline.PipelineConfig.batch_size=1',
  '--gin.transforms.AudioConfig.crop_samples=7680',
  # A spawned grain worker: it inherits the blocked SIGINT, so the
  # interrupt must end it (commands._end).
  '--gin.pipeline.PipelineConfig.num_workers=1',
  '--gin.step.StepConfig.warmup_steps=100000',
)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
  workdir = tmp_path / 'run'
  log = tmp_path / 'log'
  with log.open('w') as out:
    proc = subprocess.Popen(
      [*command('spectrostream-train'), f'--workdir={workdir}', *TINY],
      cwd=REPO,
      env=env(),
      stdout=subprocess.DEVNULL,
      stderr=out,
    )
  try:
    deadline = time.time() + 300
    while 'step 3/100000' not in log.read_text():
      assert proc.poll() is None, log.read_text()[-3000:]
      assert time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
  finally:
    proc.kill()
  text = log.read_text()
  assert rc == 130, text[-3000:]
  assert 'Traceback' not in text and 'core dumped' not in text
  mentions = [line for line in text.splitlines() if 'interrupted' in line]
  assert len(mentions) == 1, text[-3000:]
  assert text.strip().splitlines()[-1] == mentions[0]
  saved = sorted(
    int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.is_dir()
  )
  assert len(saved) == 1 and saved[0] >= 3, saved
  assert mentions[0] == (
    f'spectrostream-train: interrupted: checkpoint {saved[0]} saved in '
    f'{workdir / "checkpoints"}; the same command resumes'
  )
  # Nothing half-written: no Orbax temp directory, no hidden temp file.
  leftovers = [p for p in workdir.rglob('*') if 'tmp' in p.name]
  assert not leftovers, leftovers


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_exits_130_at_once(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
    [*command('spectrostream-train'), f'--workdir={workdir}', *TINY],
    cwd=REPO,
    env=env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(3)  # Importing JAX, parsing gin or compiling.
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err
  assert err.strip().splitlines()[-1] == 'spectrostream-train: interrupted'
  assert not (workdir / 'checkpoints').exists() or not any(
    (workdir / 'checkpoints').iterdir()
  )

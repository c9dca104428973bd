"""What spectrostream-export, -eval and -data share (commands.py): Ctrl-C,
--version, -q/-v and dashed flags, run through the console entry points
that pyproject.toml names.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

from console_scripts import command
import numpy as np
import pytest
import soundfile as sf

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ('spectrostream-export', 'spectrostream-eval', 'spectrostream-data')


def run(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [*command(name), *args],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.parametrize('name', COMMANDS)
def test_version(name):
  done = run(name, '--version')
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith(f'{name} (spectrostream_jax ')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp('music')
  rng = np.random.default_rng(0)
  for i in range(2):
    sf.write(out / f'{i}.wav', 0.1 * rng.standard_normal((96000, 2)), 48000)
  return out


def sigint_blocked(pid: int) -> bool:
  """Has the process's main thread blocked SIGINT (commands.py's setup)?"""
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('SigBlk:'):
        return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
  return False


def interrupt(argv, cwd, when) -> tuple[int, str]:
  """Runs `argv` and sends SIGINT; (status, stderr).

  `when`: 'import' as soon as SIGINT handling is set up (JAX and the
  package are being imported then; after 3 s at most), or seconds.
  """
  proc = subprocess.Popen(
    argv,
    cwd=cwd,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  if when == 'import':
    deadline = time.time() + 3
    while time.time() < deadline and not sigint_blocked(proc.pid):
      time.sleep(0.005)
  else:
    time.sleep(when)
  assert proc.poll() is None, 'the command ended before the interrupt'
  proc.send_signal(signal.SIGINT)
  try:
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  return proc.returncode, err


@pytest.mark.parametrize(
  'name,args,when',
  [
    (
      'spectrostream-export',
      ['--workdir', '{tmp}/run', '--out', '{out}'],
      'import',
    ),
    ('spectrostream-data', ['build', '{data}', '{out}'], 'import'),
    (
      'spectrostream-eval',
      ['--model', '{model}', '--data', '{data}'],
      'import',
    ),
    # Loading clips, compiling the codec or scoring.
    ('spectrostream-eval', ['--model', '{model}', '--data', '{data}'], 12),
  ],
)
def test_ctrl_c_is_one_line_and_130(
  name, args, when, data_dir, tiny_model_dir, tmp_path
):
  out = tmp_path / 'out'
  paths = {'tmp': tmp_path, 'out': out, 'data': data_dir}
  paths['model'] = tiny_model_dir
  argv = [*command(name), *(a.format(**paths) for a in args)]
  if name == 'spectrostream-eval':
    argv += ['--out', str(out), '--workers', '0', '--clip-seconds', '1']
  status, err = interrupt(argv, REPO, when)
  assert status == 130, err
  assert err.strip().splitlines() == [f'{name}: interrupted'], err
  # Nothing half-made: no --out, no temp file.
  assert list(tmp_path.iterdir()) == []


def test_export_flags_have_dashes_and_the_old_spelling_still_works(tmp_path):
  done = run('spectrostream-export', '--help')
  assert '--block-frames' in done.stdout
  assert '--block_frames' not in done.stdout
  assert '-q, --quiet' in done.stdout and '-v, --verbose' in done.stdout
  for flag in ('--block-frames', '--block_frames'):
    done = run(
      'spectrostream-export',
      f'--workdir={tmp_path / "none"}',
      f'--out={tmp_path / "m"}',
      flag,
      '1',
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
      f'spectrostream-export: error: no such workdir: {tmp_path / "none"}'
    )


def test_parser_maps_underscores_only_onto_known_dashed_flags():
  from spectrostream_jax import commands

  parser = commands.Parser(prog='p')
  parser.add_argument('--clip-seconds', type=float)
  parser.add_argument('name', nargs='*')
  args = parser.parse_args(['--clip_seconds=2', '--', '--clip_seconds'])
  assert args.clip_seconds == 2.0 and args.name == ['--clip_seconds']
  assert parser.parse_args(['--clip_seconds', '3']).clip_seconds == 3.0
  with pytest.raises(SystemExit):
    parser.parse_args(['--other_flag', '1'])


_KILLED_WORKER = """
import multiprocessing, sys, time
from spectrostream_jax import commands
commands.exit_on_interrupt('x')
def worker(queue):
  global lock
  lock = multiprocessing.get_context('spawn').Lock()  # Registered, kept.
  queue.put(1)
  time.sleep(60)
if __name__ == '__main__':
  ctx = multiprocessing.get_context('spawn')
  queue = ctx.Queue()
  p = ctx.Process(target=worker, args=(queue,))
  p.start()
  queue.get()
  p.kill()  # As an interrupt ends workers.
  p.join()
  print('x: interrupted', file=sys.stderr)
"""


def test_a_killed_worker_adds_no_line_after_the_last(tmp_path):
  """The resource tracker's leak warning would print after our line."""
  script = tmp_path / 'killed_worker.py'
  script.write_text(_KILLED_WORKER)
  result = subprocess.run(
    [sys.executable, str(script)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines() == ['x: interrupted'], result.stderr

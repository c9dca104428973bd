"""Ctrl-C ends `spectrostream` at once: one line, exit 130, no temp file.

A reader that closes the pipe early (`| head`) ends it quietly too.

The command runs as its console script would: the entry point is read
from pyproject.toml and called with the repository root as the working
directory, so this checks whatever entry point the tree declares.
Issue 19, item 1.
"""

import os
import pathlib
import signal
import subprocess
import time

from console_scripts import command
import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax import bitstream
from spectrostream_jax import cli
from spectrostream_jax import export
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECONDS = 120  # Of audio: a few seconds of work for the tiny model.


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """A model, a long 24 kHz mono file and a long bitstream of its model."""
  folder = tmp_path_factory.mktemp('inputs')
  codec = Codec.random(codec_lib.tiny(), seed=5)
  export.export_model(codec, str(folder / 'tiny'), block_frames=[4])
  rng = np.random.default_rng(0)
  x = 0.1 * rng.standard_normal((SECONDS * 24_000, 1))
  sf.write(folder / 'long.wav', x.astype(np.float32), 24_000, 'PCM_16')
  cfg = codec.config
  frames = SECONDS * round(cfg.frame_rate)
  header = bitstream.Header(
    channels=cfg.num_channels,
    levels=cfg.quantizer.num_levels,
    bits=cfg.bits_per_level,
    original_length=SECONDS * 48_000,
    original_sample_rate=48_000,
    original_channels=2,
    model_id=bytes.fromhex(codec.codes_id),
    sample_rate=cfg.sample_rate,
    samples_per_frame=cfg.samples_per_frame,
    lookahead_frames=cfg.lookahead,
  )
  codes = rng.integers(0, 2**cfg.bits_per_level, (frames, header.levels))
  with bitstream.Writer(folder / 'long.sps', header) as writer:
    writer.append(codes)
  return folder


def _temp_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in folder.iterdir() if p.name.startswith('.')]


def _started(p, folder):
  """Returns once the first output temp file exists: the model is loaded
  and the first block is compiling."""
  while p.poll() is None and not _temp_files(folder):
    time.sleep(0.01)


def _size(path: pathlib.Path) -> int:
  try:
    return path.stat().st_size
  except FileNotFoundError:
    return 0


def _writing(p, folder):
  """Returns once the temp file holds coded or decoded blocks (past the
  headers and the first write buffer)."""
  while p.poll() is None and not any(
    _size(t) > 4096 for t in _temp_files(folder)
  ):
    time.sleep(0.01)


def _importing(p, folder):
  del folder
  time.sleep(0.5)


@pytest.mark.parametrize(
  'subcommand,when',
  [
    ('encode', _importing),
    ('encode', _started),
    ('encode', _writing),
    ('decode', _writing),
  ],
  ids=['encode-importing', 'encode-compiling', 'encode-blocks', 'decode'],
)
def test_ctrl_c_exits_130_at_once_with_one_line_and_no_temp_file(
  inputs, tmp_path, subcommand, when
):
  src, out = {
    'encode': ('long.wav', tmp_path / 'out.sps'),
    'decode': ('long.sps', tmp_path / 'out.wav'),
  }[subcommand]
  # Two blocks of 60 s: the interrupt comes as the second one starts, so
  # a KeyboardInterrupt would wait seconds for it to end.
  argv = [subcommand, '--model', inputs / 'tiny', '--block-seconds', 60]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # One device, as a user has.
  p = subprocess.Popen(
    [*command('spectrostream'), *map(str, [*argv, inputs / src, out])],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    when(p, tmp_path)
    assert p.poll() is None, 'finished before the interrupt'
    p.send_signal(signal.SIGINT)
    sent = time.monotonic()
    stdout, stderr = p.communicate(timeout=60)
    took = time.monotonic() - sent
  finally:
    if p.poll() is None:
      p.kill()
      p.communicate()
  assert (p.returncode, stderr, stdout) == (
    130,
    'spectrostream: interrupted\n',
    '',
  )
  assert list(tmp_path.iterdir()) == []
  assert took < 1.5, f'{took:.1f} s to stop'


def test_main_leaves_keyboard_interrupt_to_its_caller(monkeypatch, tmp_path):
  """A library caller of `cli.main` gets Python's KeyboardInterrupt."""

  def interrupted(path, *args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(bitstream, 'read_header', interrupted)
  with pytest.raises(KeyboardInterrupt):
    cli.main(['info', str(tmp_path / 'x.sps')])


def test_closed_stdout_is_not_a_traceback(inputs):
  p = subprocess.Popen(
    [*command('spectrostream'), 'info', str(inputs / 'long.sps')],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  p.stdout.close()  # Before the command has printed anything.
  stderr = p.stderr.read()
  p.wait(timeout=60)
  assert (p.returncode, stderr) == (141, '')

"""Training curves read back from TensorBoard events without TensorFlow."""

import numpy as np
from tensorboardX import SummaryWriter

from spectrostream_jax.training import curves


def test_read_scalars_and_plot(tmp_path):
  logdir = tmp_path / 'tensorboard'
  writer = SummaryWriter(str(logdir))
  for step in range(1, 6):
    writer.add_scalar('g/mel', 100.0 / step, step)
  writer.add_scalar('eval/si_sdr', -3.5, 5)
  writer.close()
  # A resumed run repeats step 5 in a second file; the later value wins.
  writer = SummaryWriter(str(logdir), filename_suffix='.resumed')
  writer.add_scalar('g/mel', 7.0, 5)
  writer.close()
  scalars = curves.read_scalars(str(logdir))
  steps, mel = scalars['g/mel']
  np.testing.assert_array_equal(steps, [1, 2, 3, 4, 5])
  np.testing.assert_allclose(mel, [100, 50, 100 / 3, 25, 7], rtol=1e-6)
  assert scalars['eval/si_sdr'][1].tolist() == [-3.5]
  out = tmp_path / 'c.png'
  assert (
    curves.main(
      ['--workdir', str(tmp_path), '--out', str(out), '--smooth', '2']
    )
    == 0
  )
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert curves.main(['--workdir', str(tmp_path / 'none'), '--out', 'x']) == 1


def test_a_glob_draws_its_matches_in_one_panel(tmp_path, capsys):
  logdir = tmp_path / 'tensorboard'
  writer = SummaryWriter(str(logdir))
  for step in range(1, 4):
    for level in range(10):
      writer.add_scalar(f'vq/usage/L{level:02d}', level / 10 + step, step)
    writer.add_scalar('g/mel', 1.0, step)
  writer.close()
  scalars = curves.read_scalars(str(logdir))
  chosen = curves.panels(scalars, ['vq/usage/L0[0-7]', 'g/mel', 'd/*'])
  assert chosen == [
    ('vq/usage/L0[0-7]', [f'vq/usage/L{i:02d}' for i in range(8)]),
    ('g/mel', ['g/mel']),
  ]
  out = tmp_path / 'c.png'
  tags = 'vq/usage/L0[0-7],g/mel'
  argv = ['--workdir', str(tmp_path), '--out', str(out), '--tags', tags]
  assert curves.main(argv) == 0
  printed = capsys.readouterr().out
  assert 'vq/usage/L07: first 1.7, last 3.7' in printed
  assert 'vq/usage/L08' not in printed
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_an_unknown_tag_is_an_error_naming_the_closest(tmp_path, capsys):
  writer = SummaryWriter(str(tmp_path / 'tensorboard'))
  for step in range(1, 3):
    writer.add_scalar('g/mel', 1.0, step)
    for level in range(3):
      writer.add_scalar(f'vq/usage/L{level:02d}', 0.5, step)
  writer.close()
  out = tmp_path / 'c.png'
  base = ['--workdir', str(tmp_path), '--out', str(out)]
  assert curves.main([*base, '--tags', 'g/mel,g/mle']) == 1
  err = capsys.readouterr().err.strip()
  assert err == (
    "curves: error: no scalar 'g/mle' was logged; did you mean g/mel? "
    'logged: g/mel, vq/usage/L*'
  )
  assert curves.main([*base, '--tags', 'd/*']) == 1
  assert "no scalar 'd/*'" in capsys.readouterr().err
  assert not out.exists()
  # The default tags: those the run did not log are left out quietly.
  assert curves.main(base) == 0
  assert out.exists()

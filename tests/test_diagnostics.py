"""The recipe's calibration: phase costs in the default recipe, not in
SoundStream's.

On four 0.64 s crops of the embedded synthetic music with small
discriminators at initialisation: the default recipe's reconstruction loss
ranks a right-magnitude, random-phase copy far below a true-phase copy
with smeared magnitudes, and its phase-sensitive terms hold a real share
of the gradient there; SoundStream's weights can hardly tell the two
apart and put nearly all the gradient in the mel term.
"""

import dataclasses

import numpy as np
import pytest

from spectrostream_jax import losses
from spectrostream_jax.data import synthetic
from spectrostream_jax.models import codec
from spectrostream_jax.models import discriminator
from spectrostream_jax.training import diagnostics
from spectrostream_jax.training import step

DISC = discriminator.DiscriminatorConfig(
  windows=(256, 512),
  base_channels=4,
  channel_multipliers=(1, 2),
  strides=((1, 2), (1, 2)),
)
SOUNDSTREAM = losses.LossConfig(
  mel_form='soundstream', phase_weight=0.0, wav_weight=0.0
)


@pytest.fixture(scope='module')
def music():
  clips = [
    synthetic.render(np.random.default_rng(seed), 32640) for seed in range(4)
  ]
  x = np.stack(clips).astype(np.float32)
  return x / np.sqrt(np.mean(x**2, axis=(1, 2), keepdims=True)) * 0.1


def test_calibration_copies_are_wrong_in_one_way_each(music):
  copies = diagnostics.calibration_copies(music, np.random.default_rng(0))
  rp, blurred = copies['random phase'], copies['blurred magnitude']
  # Random phase: the level per mel band survives (the resynthesis is not
  # a consistent STFT, so not exactly), the waveform does not.
  assert float(np.mean(losses.mel_distance(music, rp))) < 0.3
  assert float(np.mean(losses.si_sdr(music, rp))) < -10
  # Blurred magnitudes keep the waveform close.
  assert float(np.mean(losses.si_sdr(music, blurred))) > 5
  np.testing.assert_allclose(copies['gain 0.9'], 0.9 * music, rtol=1e-6)
  np.testing.assert_array_equal(copies['5 ms late'][:, 240:], music[:, :-240])


def test_default_recipe_sees_phase_and_soundstream_does_not(music):
  reports = {
    name: diagnostics.report(
      step.StepConfig(codec=codec.small(), discriminator=DISC, loss=loss),
      music,
    )
    for name, loss in (
      ('default', losses.LossConfig()),
      ('soundstream', SOUNDSTREAM),
    )
  }
  ratio = {k: r['random phase / blurred magnitude'] for k, r in reports.items()}
  shares = {k: r['random phase']['grad_share'] for k, r in reports.items()}
  print(ratio, shares)
  # Measured: 19.9 against 2.4; phase + wav 10.6 % of the gradient, mel
  # 8.2 %, feature matching the rest; SoundStream's mel term 99.4 %.
  assert ratio['default'] > 10
  assert ratio['default'] > 4 * ratio['soundstream']
  phase = shares['default']['phase'] + shares['default']['wav']
  assert phase > 0.05
  assert shares['default']['mel'] > 0.04
  assert 'phase' not in shares['soundstream']
  assert shares['soundstream']['mel'] > 0.95


def test_report_keys(music):
  config = step.StepConfig(
    codec=codec.small(),
    discriminator=DISC,
    loss=dataclasses.replace(losses.LossConfig(), wav_weight=0.0),
  )
  report = diagnostics.report(config, music[:1])
  for name in ('random phase', 'blurred magnitude', '5 ms late', 'gain 0.9'):
    entry = report[name]
    assert set(entry['grad_share']) == {'mel', 'phase', 'feat', 'adv'}
    assert sum(entry['grad_share'].values()) == pytest.approx(1.0)
    assert 'wav' not in entry['terms']

"""launch/: the sweep expansion reaches the model config; scripts parse."""

import json
import pathlib
import runpy
import shutil
import subprocess
import sys

import pytest

import gin
from spectrostream_jax.training import train

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / 'launch'
sweep = runpy.run_path(str(LAUNCH / 'sweep.py'))


def test_grids_expand_without_duplicates():
  runs = sweep['expand'](
    {
      'gin_files': [],
      'defaults': {'a.b.x': 1, 'a.b.y': 'p'},
      'grids': [{'a.b.x': [0, 1]}, {'a.b.y': ['p', 'q'], 'a.b.x': [2]}],
    }
  )
  assert runs == [
    ('x0_yp', {'a.b.x': 0, 'a.b.y': 'p'}),
    ('x1_yp', {'a.b.x': 1, 'a.b.y': 'p'}),
    ('x2_yp', {'a.b.x': 2, 'a.b.y': 'p'}),
    ('x2_yq', {'a.b.x': 2, 'a.b.y': 'q'}),
  ]


def test_a_swept_key_needs_a_default():
  with pytest.raises(ValueError, match='no default'):
    sweep['expand']({'grids': [{'a.x': [1]}, {'a.y': [2]}]})


def sweep_models(spec: dict) -> dict:
  """{run name: (its StepConfig, its train.num_steps)} as gin builds them."""
  out = {}
  for name, bindings in sweep['expand'](spec):
    flags = sweep['train_flags'](spec, bindings)
    files = [f.split('=', 1)[1] for f in flags if f.startswith('--gin_file=')]
    values = [
      f.split('=', 1)[1] for f in flags if f.startswith('--gin_bindings=')
    ]
    gin.clear_config()
    try:
      train.parse_gin(files, values)
      model = gin.query_parameter('train.model').scoped_configurable_fn()
      out[name] = (model, gin.query_parameter('train.num_steps'))
    finally:
      gin.clear_config()
  return out


def test_ablation_sweep_sets_the_codec_fields(tmp_path):
  spec = json.loads((LAUNCH / 'sweeps' / 'ablations.json').read_text())
  runs = sweep_models(spec)
  got = set()
  for name, (model, steps) in runs.items():
    assert steps == 200000
    got.add((model.codec.fusion_block, model.codec.lookahead))
    assert name == (
      f'fusion_block{model.codec.fusion_block}_lookahead{model.codec.lookahead}'
    )
  assert got == {(5, 1), (6, 1), (7, 1), (6, 0), (6, 2), (6, 3)}
  assert len(runs) == 6
  printed = subprocess.run(
    [
      sys.executable,
      str(LAUNCH / 'sweep.py'),
      str(LAUNCH / 'sweeps/ablations.json'),
      str(tmp_path),
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert len(printed) == 6
  assert all(f'--workdir={tmp_path}/' in line for line in printed)


@pytest.mark.parametrize(
  'script', ['local.sh', 'slurm_gpu.sbatch', 'tpu_pod.sh']
)
def test_scripts_parse_and_explain_themselves(script):
  path = LAUNCH / script
  subprocess.run(['bash', '-n', str(path)], check=True)
  usage = subprocess.run(['bash', str(path)], capture_output=True, text=True)
  assert usage.returncode == 2
  assert 'usage' in usage.stderr.lower() or 'WORKDIR' in usage.stderr


def test_named_arms_bind_several_keys_and_lists_as_tuples():
  spec = {
    'gin_files': [],
    'defaults': {'a.x': 1},
    'arms': {'base': {}, 'wide': {'a.x': 2, 'a.ch': [4, 8]}},
  }
  runs = sweep['expand'](spec)
  assert runs == [('base', {'a.x': 1}), ('wide', {'a.x': 2, 'a.ch': [4, 8]})]
  assert sweep['train_flags'](spec, runs[1][1]) == [
    '--gin_bindings=a.x = 2',
    '--gin_bindings=a.ch = (4, 8)',
  ]
  with pytest.raises(ValueError, match='grids or arms'):
    sweep['expand']({**spec, 'grids': [{'a.x': [1]}]})


def test_third_step_sweep_sets_each_arms_recipe():
  spec = json.loads((LAUNCH / 'sweeps' / 'third_step.json').read_text())
  runs = sweep_models(spec)
  assert {steps for _, steps in runs.values()} == {1500}
  got = {name: model for name, (model, _) in runs.items()}
  assert list(got) == ['today', 'balancer', 'wide_decoder', 'late_gan']
  today = got['today']
  assert not today.loss.balancer and today.warmup_steps == 200
  assert got['balancer'].loss.balancer
  assert got['balancer'].loss.balancer_decay == 0.99
  weights = got['balancer'].loss.weights()
  assert weights['wav'] / sum(weights.values()) == pytest.approx(0.25)
  assert got['wide_decoder'].codec.decoder_channels == (
    256,
    128,
    128,
    64,
    32,
    32,
    16,
  )
  assert got['late_gan'].warmup_steps == 600
  # Everything else is today's recipe.
  assert got['late_gan'].loss == today.loss
  assert got['wide_decoder'].loss == today.loss


def test_sweep_report_tables_each_runs_scores(tmp_path):
  from spectrostream_jax.training import train_logging

  spec = {'gin_files': [], 'arms': {'a': {}, 'b': {}}}
  (tmp_path / 'sweep.json').write_text(json.dumps(spec))
  for name, rate in (('a', 0.5), ('b', 0.25)):
    writer = train_logging.Writer(str(tmp_path / name / 'tensorboard'))
    for step in (100, 200):
      writer.scalars(
        step,
        {'perf/steps_per_second': rate, 'eval/si_sdr/1kbps': step / 100},
      )
    writer.close()
  ladder = tmp_path / 'a' / 'ladder'
  ladder.mkdir()
  rows = [
    {
      'kbps_requested': k,
      'mean': {'si_sdr': k / 2, 'mel_distance': 0.3, 'lsd': 9.0},
    }
    for k in (1.0, 4.0, 16.0)
  ]
  (ladder / 'results.json').write_text(
    json.dumps({'rows': rows, 'codebooks': {'perplexity': [321.0]}})
  )
  out = tmp_path / 'report'
  subprocess.run(
    [
      sys.executable,
      str(LAUNCH / 'sweep_report.py'),
      str(tmp_path / 'sweep.json'),
      str(tmp_path),
      '--out',
      str(out),
    ],
    check=True,
    capture_output=True,
  )
  summary = json.loads((out / 'summary.json').read_text())
  # 200 steps at 0.5 steps/s; b has no ladder.
  assert summary['a']['seconds'] == pytest.approx(400.0)
  assert summary['a']['si_sdr/16'] == 8.0
  assert summary['a']['perplexity_l1'] == 321.0
  assert summary['b']['steps_per_second'] == pytest.approx(0.25)
  assert 'si_sdr/1' not in summary['b']
  lines = (out / 'table.md').read_text().splitlines()
  assert lines[2].startswith('| a | 200 | 0.11 h | 0.500 | 0.50 | 2.00 | 8.00')
  assert lines[3].startswith('| b | 200 | 0.22 h | 0.250 | – |')
  assert (out / 'curves.png').stat().st_size > 1000


def test_sweep_report_keeps_runs_that_are_gone(tmp_path):
  """A run trained in an earlier session is reported from OUT/runs."""
  from spectrostream_jax.training import train_logging

  spec = {'gin_files': [], 'arms': {'a': {}, 'b': {}}}
  (tmp_path / 'sweep.json').write_text(json.dumps(spec))
  out = tmp_path / 'report'
  cmd = [
    sys.executable,
    str(LAUNCH / 'sweep_report.py'),
    str(tmp_path / 'sweep.json'),
    str(tmp_path / 'root'),
    '--out',
    str(out),
  ]
  for name, rate in (('a', 0.5), ('b', 0.25)):
    writer = train_logging.Writer(str(tmp_path / 'root' / name / 'tensorboard'))
    for step in (100, 200):
      writer.scalars(
        step,
        {
          'perf/steps_per_second': rate,
          'eval/si_sdr/1kbps': step / 100,
          'perf/not_plotted': 1.0,
        },
      )
    writer.close()
    subprocess.run(cmd, check=True, capture_output=True)
    # Only `name` trains in this "session".
    shutil.rmtree(tmp_path / 'root' / name)
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['a']['seconds'] == pytest.approx(400.0)
  assert summary['b']['seconds'] == pytest.approx(800.0)
  record = json.loads((out / 'runs' / 'a.json').read_text())
  assert record['scalars']['eval/si_sdr/1kbps'] == [[100, 200], [1.0, 2.0]]
  assert 'perf/not_plotted' not in record['scalars']
  lines = (out / 'table.md').read_text().splitlines()
  assert [line.split(' | ')[0] for line in lines[2:]] == ['| a', '| b']

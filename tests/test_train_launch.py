"""launch/: the sweep expansion reaches the model config; scripts parse."""

import json
import pathlib
import runpy
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


def test_ablation_sweep_sets_the_codec_fields(tmp_path):
  spec = json.loads((LAUNCH / 'sweeps' / 'ablations.json').read_text())
  runs = sweep['expand'](spec)
  got = set()
  for name, bindings in runs:
    flags = sweep['train_flags'](spec, bindings)
    files = [f.split('=', 1)[1] for f in flags if f.startswith('--gin_file=')]
    values = [
      f.split('=', 1)[1] for f in flags if f.startswith('--gin_bindings=')
    ]
    gin.clear_config()
    try:
      train.parse_gin(files, values)
      model = gin.query_parameter('train.model').scoped_configurable_fn()
      assert gin.query_parameter('train.num_steps') == 200000
    finally:
      gin.clear_config()
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

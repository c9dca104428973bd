"""benchmarks/device_check.py --quick, the way CI runs it on CPU."""

import json
import os
import pathlib
import re
import subprocess
import sys

from conftest import SHARED
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# benchmarks/ is not installed with the package: import it from the tree.
sys.path.insert(0, str(REPO))
from benchmarks import device_check  # noqa: E402


def run_quick(workdir: pathlib.Path) -> dict:
  """The JSON of one quick run, in its own process with one CPU device."""
  flags = os.environ.get('XLA_FLAGS', '')
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=re.sub(
      r'--xla_force_host_platform_device_count=\d+', '', flags
    ).strip(),
    PYTHONPATH=os.pathsep.join(
      [str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])]
    ),
  )
  done = subprocess.run(
    [
      sys.executable,
      'benchmarks/device_check.py',
      '--quick',
      f'--workdir={workdir}',
      f'--vectors={SHARED / "vectors"}',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    # A guard against a hang, not a speed test: the run took 6 min 40 s of
    # CPU time, 14 min on a 2-core machine shared with other jobs.
    timeout=1800,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout)


# One test, so that pytest-xdist runs the check once.
@pytest.mark.slow
def test_quick_run(tmp_path):
  r = run_quick(tmp_path)
  assert (r['quick'], r['backend'], r['devices']) == (True, 'cpu', 1)
  stages = [k for k, v in r.items() if isinstance(v, dict)]
  assert stages == [
    'parity',
    'codec_speed',
    'streaming',
    'train',
    'train_step/tiny/float32',
  ]
  failed = {k: v for k, v in r.items() if isinstance(v, dict) and 'error' in v}
  if not (SHARED / 'vectors').is_dir():
    assert 'vectors' in failed.pop('parity')['error']
  assert not failed

  if (SHARED / 'vectors').is_dir():
    p = r['parity']
    # On CPU the default precision is float32: no 'highest' run.
    assert 'highest' not in p
    d = p['default']
    assert d['all_within_tolerance']
    assert sorted(d['arrays']) == sorted(device_check.parity_tolerances())
    assert d['codes_from_oracle_embeddings_mismatches'] == 0
    assert 0 < d['worst_relative_to_peak'] < 1e-4

  c, s = r['codec_speed'], r['streaming']
  assert c['preset'] == s['preset'] == 'tiny'
  for name in ('encode', 'decode'):
    assert 0 < c[name]['seconds'] < 60
    assert c[name]['gflop'] > 0
    assert c[name]['mfu'] is None  # No CPU peak in the table.
    assert 0 < s[name]['median_ms'] < 10_000
    assert s['device_step'][name]['gflop'] > 0

  m = r['train_step/tiny/float32']
  assert (m['batch'], m['dtype'], m['mfu']) == (1, 'float32', None)
  assert m['gflop'] > m['warmup_gflop'] > 0
  assert m['steps_per_second'] > 0 and m['compile_seconds'] > 0

  t = r['train']
  assert t['steps'] >= 1 and t['steps_per_second'] > 0
  assert t['trained_seconds'] >= 5
  config = json.loads((pathlib.Path(t['export']) / 'config.json').read_text())
  assert config['model_id'] == t['model_id']
  assert re.fullmatch('[0-9a-f]{64}', t['model_id'])
  assert config['step'] == t['steps']

  text = device_check.markdown(r)
  assert text.startswith('## Device check: cpu × 1')
  assert '| tiny | float32 | 1 × 0.2 s |' in text
  assert f'`{t["export"]}`' in text

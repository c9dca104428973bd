"""Test setup: 8 fake CPU devices, and the shared reference data."""

import os
import pathlib

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(
  os.environ.get('SPECTROSTREAM_SHARED', REPO.parent / 'shared')
)


def require_shared() -> pathlib.Path:
  """The shared/ folder; skips (outside CI only) when it is absent."""
  if not (SHARED / 'vectors').is_dir():
    if os.environ.get('CI'):
      pytest.fail(f'{SHARED} is missing in CI: the parity tests must run')
    pytest.skip(
      f'reference data not found at {SHARED} (set SPECTROSTREAM_SHARED)'
    )
  return SHARED


@pytest.fixture(scope='session')
def shared_dir() -> pathlib.Path:
  return require_shared()


@pytest.fixture(scope='session')
def parity_weights(shared_dir, tmp_path_factory) -> pathlib.Path:
  """The official-layout random weights behind the vectors, regenerated."""
  import runpy

  out = tmp_path_factory.mktemp('mrt_params_A')
  mod = runpy.run_path(str(shared_dir / 'vectors' / 'make_params.py'))
  mod['write_official_files'](mod['make_params'](0), str(out))
  return out


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory) -> str:
  """A tiny random stereo model (seed 0) written as a model directory."""
  from spectrostream_jax import inference
  from spectrostream_jax import model_dir
  from spectrostream_jax.models import codec as codec_lib

  out = tmp_path_factory.mktemp('tiny_model')
  config = codec_lib.tiny()
  model_dir.write(
    str(out), inference.Codec.random(config, seed=0).params, config
  )
  return str(out)

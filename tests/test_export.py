"""`spectrostream-export` and `Codec.load`: model dirs, StableHLO, the CLI.

A random tiny codec is exported and read back bit for bit; its StableHLO
artifacts run in a subprocess that never imports spectrostream_jax; a
two-step training run is exported through the console script and its
weights are the checkpoint's parameter EMA.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from spectrostream_jax import Codec
from spectrostream_jax import export
from spectrostream_jax import model_dir as model_dir_lib
from spectrostream_jax import weights
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.training import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
FRAMES = 4
TRAIN_ARGS = (
  '--gin_file=experiments/quickstart.gin',
  '--gin.train.num_steps=2',
  '--gin.train.eval_every=0',
  '--gin.checkpoint.CheckpointConfig.every=1',
  '--gin.discriminator.DiscriminatorConfig.windows=(64, 128)',
  '--gin.discriminator.DiscriminatorConfig.base_channels=4',
  '--gin.discriminator.DiscriminatorConfig.channel_multipliers=(1, 2)',
  '--gin.discriminator.DiscriminatorConfig.strides=((1, 2), (1, 2))',
  '--gin.pipeline.PipelineConfig.batch_size=2',
  '--gin.transforms.AudioConfig.crop_samples=7680',
  # Not the tiny preset, so the config must come from the checkpoint.
  '--gin.quantizer.QuantizerConfig.codebook_size=8',
  '--gin.train.eval_kbps=(0.15, 0.3, 0.6)',
  '--gin.train.log_grad_norms=False',
)


@pytest.fixture(scope='module')
def codec():
  return Codec.random(codec_lib.tiny(), seed=1)


@pytest.fixture(scope='module')
def model_dir(codec, tmp_path_factory):
  out = tmp_path_factory.mktemp('export') / 'model'
  export.export_model(codec, str(out), step=7, block_frames=(FRAMES,))
  return out


def clip(b=2, t=FRAMES * 1920, seed=0):
  x = np.random.default_rng(seed).uniform(-0.5, 0.5, (b, t, 2))
  return x.astype(np.float32)


def test_layout_and_config(codec, model_dir):
  assert sorted(os.listdir(model_dir)) == [
    'config.json',
    'encoder.safetensors',
    'soundstream.safetensors',
    'stablehlo',
  ]
  assert sorted(os.listdir(model_dir / 'stablehlo')) == [
    f'decode_{FRAMES}.jaxexport',
    f'encode_{FRAMES}.jaxexport',
    'manifest.json',
  ]
  meta = json.loads((model_dir / 'config.json').read_text())
  files = [
    model_dir / 'encoder.safetensors',
    model_dir / 'soundstream.safetensors',
  ]
  digest = hashlib.sha256(b''.join(f.read_bytes() for f in files)).hexdigest()
  assert meta['model_id'] == digest == codec.model_id
  assert meta['preset'] == 'tiny' and meta['step'] == 7
  assert (meta['num_levels'], meta['codebook_size']) == (8, 64)
  assert meta['sample_rate'] == 48_000
  assert model_dir_lib.config_from_dict(meta['codec_config']) == codec.config
  # Not a preset: still rebuilt exactly, and named null.
  config = codec_lib.CodecConfig(lookahead=2, split_block=-1)
  as_json = json.loads(
    json.dumps(model_dir_lib.model_config(config, digest, 1))
  )
  assert as_json['preset'] is None
  assert model_dir_lib.config_from_dict(as_json['codec_config']) == config


def test_load_round_trip_is_bitwise(codec, model_dir):
  loaded = Codec.load(str(model_dir))
  assert loaded.config == codec.config and loaded.model_id == codec.model_id
  for a, b in zip(
    jax.tree.leaves(loaded.params), jax.tree.leaves(codec.params), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  x = clip()
  codes = codec.encode(x)
  np.testing.assert_array_equal(loaded.encode(x), codes)
  np.testing.assert_array_equal(loaded.decode(codes), codec.decode(codes))


STANDALONE = textwrap.dedent(
  """
  import json, pathlib, sys
  import jax, numpy as np, safetensors.numpy

  model, io = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
  weights = {}
  for name in ('encoder.safetensors', 'soundstream.safetensors'):
    weights.update(safetensors.numpy.load_file(model / name))
  manifest = json.loads((model / 'stablehlo' / 'manifest.json').read_text())
  run = {}
  for name, entry in manifest['functions'].items():
    blob = (model / 'stablehlo' / entry['file']).read_bytes()
    run[entry['kind']] = jax.export.deserialize(blob)
  wav = np.load(io / 'wav.npy')
  codes = np.asarray(run['encode'].call(weights, wav))
  out = np.asarray(run['decode'].call(weights, codes))
  # Fewer levels: zero the codebooks of the levels left out.
  book = 'params/soundstream/quantizer/embedding'
  weights[book] = weights[book].copy()
  weights[book][3:] = 0
  out3 = np.asarray(run['decode'].call(weights, codes))
  np.savez(io / 'out.npz', codes=codes, out=out, out3=out3)
  assert 'spectrostream_jax' not in sys.modules, 'imported our code'
  """
)


@pytest.mark.slow
def test_stablehlo_runs_without_our_code(codec, model_dir, tmp_path):
  manifest = json.loads((model_dir / 'stablehlo' / 'manifest.json').read_text())
  assert manifest['model_id'] == codec.model_id
  assert manifest['platforms'] == ['cpu', 'cuda', 'tpu']
  encode = manifest['functions'][f'encode_{FRAMES}']
  assert encode['args'][1]['shape'] == ['batch', FRAMES * 1920, 2]
  assert encode['results'][0] == {
    'name': 'codes',
    'shape': ['batch', FRAMES, 8],
    'dtype': 'int32',
  }
  decode = manifest['functions'][f'decode_{FRAMES}']
  assert decode['results'][0]['shape'] == ['batch', (FRAMES - 1) * 1920, 2]

  wav = clip()
  np.save(tmp_path / 'wav.npy', wav)
  script = tmp_path / 'standalone.py'
  script.write_text(STANDALONE)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(
    [sys.executable, str(script), str(model_dir), str(tmp_path)],
    cwd=tmp_path,
    env={**env, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.load(tmp_path / 'out.npz')
  codes = codec.encode(wav)
  np.testing.assert_array_equal(got['codes'], codes)
  np.testing.assert_allclose(got['out'], codec.decode(codes), atol=1e-5)
  np.testing.assert_allclose(
    got['out3'], codec.decode(codes[..., :3]), atol=1e-5
  )


def test_refuses_to_overwrite_unless_asked(codec, tmp_path):
  out = tmp_path / 'model'
  out.mkdir()  # An empty directory is fine.
  kwargs = dict(block_frames=(2,), platforms=('cpu',))
  model_id = export.export_model(codec, str(out), **kwargs)
  (out / 'note.txt').write_text('keep me')
  with pytest.raises(ValueError, match='not empty; pass --overwrite'):
    export.export_model(codec, str(out), **kwargs)
  assert (out / 'note.txt').exists()
  assert export.export_model(codec, str(out), overwrite=True, **kwargs) == (
    model_id
  )
  assert not (out / 'note.txt').exists()
  assert Codec.load(str(out)).model_id == model_id
  assert sorted(os.listdir(tmp_path)) == ['model']  # No temporary left.
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match='not a directory'):
    export.export_model(codec, str(tmp_path / 'file'), **kwargs)


@pytest.mark.parametrize(
  'frames,match',
  [
    ((1,), 'ints > 1'),
    ((0,), 'ints > 1'),
    ((2.5,), 'ints > 1'),
    ((), 'distinct'),
    ((4, 4), 'distinct'),
  ],
)
def test_bad_block_frames(codec, tmp_path, frames, match):
  with pytest.raises(ValueError, match=match):
    export.export_model(codec, str(tmp_path / 'm'), block_frames=frames)
  assert not (tmp_path / 'm').exists()


def save_run(workdir, params, records: dict) -> None:
  """A workdir whose checkpoint at each step holds `records[step]`."""
  ckpt = checkpoint.Checkpointer(
    str(workdir / 'checkpoints'),
    checkpoint.CheckpointConfig(
      every=1, keep=len(records), best_metric=None, async_save=False
    ),
  )
  data = iter(grain.MapDataset.range(8).to_iter_dataset())
  for step, record in records.items():
    state = {
      'params': params,
      'ema_params': jax.tree.map(lambda x, s=step: x * s, params),
    }
    assert ckpt.save(step, state, data, record, force=True)
  ckpt.close()


def run_record(config: codec_lib.CodecConfig) -> dict:
  """What the trainer records: asdict of its StepConfig, codec inside."""
  return {'gin': '', 'model': {'codec': dataclasses.asdict(config)}}


def test_exports_the_config_each_checkpoint_recorded(codec, tmp_path):
  """A run resumed with other bindings records them with its own saves;
  each step exports with the config it was saved under."""
  resumed = dataclasses.replace(codec.config, lookahead=2)
  save_run(
    tmp_path / 'run',
    codec.params,
    {1: run_record(codec.config), 2: run_record(resumed)},
  )
  for step, config in ((1, codec.config), (None, resumed)):
    out = tmp_path / f'step{step}'
    _, exported = export.export_workdir(
      str(tmp_path / 'run'),
      str(out),
      step=step,
      block_frames=(4,),
      platforms=('cpu',),
    )
    loaded = Codec.load(str(out))
    assert loaded.config == config
    for key, value in weights.flatten(loaded.params).items():
      want = weights.flatten(codec.params)[key] * exported
      np.testing.assert_allclose(value, want, rtol=1e-6)


def test_importing_export_leaves_the_trainer_out():
  code = (
    'import sys, spectrostream_jax.export; '
    "print(sorted(m for m in sys.modules if m == 'gin' or "
    "m.startswith('spectrostream_jax.training.')))"
  )
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=True
  ).stdout.strip()
  assert out == "['spectrostream_jax.training.checkpoint']"


@pytest.mark.parametrize(
  'record,match',
  [
    ({'gin': ''}, 'records no model.codec config'),
    ({'model': {'codec': {'colour': 1}}}, r"unknown fields \['colour'\]"),
    (
      {'model': {'codec': {'num_channels': 1}}},
      'does not fit its recorded CodecConfig',
    ),
  ],
)
def test_bad_recorded_config(codec, tmp_path, record, match):
  save_run(tmp_path / 'run', codec.params, {1: record})
  with pytest.raises(ValueError, match=match):
    export.export_workdir(str(tmp_path / 'run'), str(tmp_path / 'm'))
  assert not (tmp_path / 'm').exists()


@pytest.mark.parametrize(
  'args,match',
  [
    (['--workdir={tmp}/nope', '--out={tmp}/m'], 'no such workdir'),
    (['--workdir={tmp}', '--out={tmp}/m'], 'no checkpoints folder'),
  ],
)
def test_cli_errors_without_a_run(tmp_path, args, match):
  args = [a.format(tmp=tmp_path) for a in args]
  with pytest.raises(SystemExit) as e:
    export.main(args)
  assert e.value.code == f'spectrostream-export: error: {match}: ' + (
    f'{tmp_path}/nope' if 'nope' in args[0] else f'{tmp_path}/checkpoints'
  )


# Model directories written by hand -------------------------------------------


def write_model_dir(codec, path, meta=None):
  """The two official files plus config.json (or `meta` instead of it)."""
  if meta is None:
    model_dir_lib.write(str(path), codec.params, codec.config)
    return path
  weights.save_official(codec.params, str(path))
  (path / 'config.json').write_text(
    meta if isinstance(meta, str) else json.dumps(meta)
  )
  return path


def test_model_dir_without_stablehlo_loads(codec, tmp_path):
  loaded = Codec.load(str(write_model_dir(codec, tmp_path)))
  assert loaded.config == codec.config
  assert loaded.model_id == codec.model_id


@pytest.mark.parametrize('preset', sorted(codec_lib.PRESETS))
def test_config_json_round_trip(preset):
  config = codec_lib.get_config(preset)
  values = json.loads(json.dumps(model_dir_lib.config_to_dict(config)))
  assert model_dir_lib.config_from_dict(values) == config
  values['quantizer']['dropout_levels'] = [1, 2, 4]
  assert model_dir_lib.config_from_dict(values).quantizer.dropout_levels == (
    1,
    2,
    4,
  )


@pytest.fixture(scope='module')
def production_dir(tmp_path_factory):
  """Production-shaped weights in the official two files, alone."""
  out = tmp_path_factory.mktemp('production')
  shapes = codec_lib.param_shapes(codec_lib.production())
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  weights.save_official(params, str(out))
  return out


def test_official_files_alone_are_production(production_dir):
  loaded = Codec.load(str(production_dir))
  assert loaded.config == codec_lib.production()
  assert loaded.model_id == model_dir_lib.files_model_id(
    str(production_dir / 'encoder.safetensors'),
    str(production_dir / 'soundstream.safetensors'),
  )


def test_tiny_config_with_production_weights(codec, production_dir, tmp_path):
  for name in ('encoder.safetensors', 'soundstream.safetensors'):
    (tmp_path / name).symlink_to(production_dir / name)
  meta = model_dir_lib.model_config(
    codec.config, Codec.load(str(production_dir)).model_id, step=None
  )
  (tmp_path / 'config.json').write_text(json.dumps(meta))
  with pytest.raises(ValueError, match='wrong preset'):
    Codec.load(str(tmp_path))


def edit(meta, **changes):
  """A copy of `meta` with `a__b=v` setting meta['a']['b'] = v."""
  out = json.loads(json.dumps(meta))
  for key, value in changes.items():
    *parents, leaf = key.split('__')
    target = out
    for p in parents:
      target = target[p]
    target[leaf] = value
  return out


@pytest.mark.parametrize(
  'change,match',
  [
    ('{"format": ', 'not readable JSON'),
    ('[1, 2]', 'not a spectrostream-model config'),
    (dict(format='other'), 'not a spectrostream-model config'),
    (dict(format_version=2), 'format_version 2'),
    (dict(model_id='abc'), 'hex SHA-256'),
    (dict(model_id='0' * 64), 'names model 000000000000'),
    (dict(codec_config=None), 'must be a JSON object'),
    (dict(codec_config__colour='red'), r"unknown fields \['colour'\]"),
    (dict(codec_config__num_channels='2'), 'num_channels must be int'),
    (dict(codec_config__encoder_strides=[[1, 'a']]), 'hold integers'),
    (dict(codec_config__quantizer__dim=3), 'not a valid config'),
    (dict(codec_config__fusion_block=99), 'fusion_block 99 out of range'),
  ],
)
def test_bad_config_json(codec, tmp_path, change, match):
  enc, snd = sorted(weights.save_official(codec.params, str(tmp_path)))
  meta = model_dir_lib.model_config(
    codec.config, model_dir_lib.files_model_id(enc, snd), step=3
  )
  if isinstance(change, dict):
    change = edit(meta, **change)
  write_model_dir(codec, tmp_path, change)
  with pytest.raises(ValueError, match=match):
    Codec.load(str(tmp_path))


def test_missing_model_dir_or_files(codec, tmp_path):
  with pytest.raises(ValueError, match='no such model directory'):
    Codec.load(str(tmp_path / 'nope'))
  write_model_dir(codec, tmp_path)
  (tmp_path / 'soundstream.safetensors').unlink()
  with pytest.raises(ValueError, match='lacks soundstream.safetensors'):
    Codec.load(str(tmp_path))


# A real training run ---------------------------------------------------------


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """Two steps of the quickstart shrunk further, a checkpoint after each."""
  base = tmp_path_factory.mktemp('train')
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=(
      '--xla_force_host_platform_device_count=1 '
      '--xla_backend_optimization_level=0'
    ),
  )
  train = pathlib.Path(sys.executable).with_name('spectrostream-train')
  result = subprocess.run(
    [str(train), f'--workdir={base / "run"}', *TRAIN_ARGS],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=420,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return base / 'run'


def checkpoint_state(workdir, step):
  path = workdir / 'checkpoints' / str(step) / 'state'
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(
    path, args=ocp.args.PyTreeRestore(restore_args=args)
  )


@pytest.mark.slow
def test_exports_the_ema_of_a_training_run(workdir, tmp_path):
  script = pathlib.Path(sys.executable).with_name('spectrostream-export')
  out = tmp_path / 'model'
  result = subprocess.run(
    [
      str(script),
      f'--workdir={workdir}',
      f'--out={out}',
      '--block-frames',
      '2',
      '--platforms',
      'cpu',
    ],
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'exported step 2' in result.stdout

  loaded = Codec.load(str(out))
  assert loaded.config.quantizer.codebook_size == 8
  meta = json.loads((out / 'config.json').read_text())
  assert meta['step'] == 2 and meta['preset'] is None
  state = checkpoint_state(workdir, 2)
  got = weights.flatten(loaded.params)
  ema, raw = (
    weights.flatten(state['ema_params']),
    weights.flatten(state['params']),
  )
  assert got.keys() == ema.keys()
  for key, value in got.items():
    np.testing.assert_array_equal(value, ema[key])
  assert any(not np.array_equal(ema[k], raw[k]) for k in ema)

  # An earlier step, in process.
  export.main(
    [
      f'--workdir={workdir}',
      f'--out={tmp_path / "step1"}',
      '--step=1',
      '--block-frames=2',
      '--platforms=cpu',
    ]
  )
  first = Codec.load(str(tmp_path / 'step1'))
  ema1 = weights.flatten(checkpoint_state(workdir, 1)['ema_params'])
  for key, value in weights.flatten(first.params).items():
    np.testing.assert_array_equal(value, ema1[key])


@pytest.mark.slow
@pytest.mark.parametrize(
  'args,match',
  [
    (['--workdir={run}', '--out={tmp}/m', '--step=9'], 'no checkpoint for'),
    (['--workdir={run}', '--out={run}'], 'not empty'),
    (['--workdir={run}', '--out={tmp}/m', '--block_frames=1'], 'ints > 1'),
  ],
)
def test_cli_errors_are_one_line(workdir, tmp_path, args, match):
  args = [a.format(tmp=tmp_path, run=workdir) for a in args]
  with pytest.raises(SystemExit) as e:
    export.main(args)
  message = e.value.code
  assert isinstance(message, str) and '\n' not in message
  assert message.startswith('spectrostream-export: error: ')
  assert match in message

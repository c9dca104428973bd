"""Fine-tuning: init_from loads exactly, frozen parts stay, codes carry over.

The tiny codec on 8 fake devices. `test_decoder_only_finetune` runs the
trainer itself for 50 steps from a model directory and exports the run.
"""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax import bitstream
from spectrostream_jax import cli
from spectrostream_jax import export
from spectrostream_jax import model_dir
from spectrostream_jax import weights
from spectrostream_jax.data import pipeline
from spectrostream_jax.data import synthetic
from spectrostream_jax.data import transforms
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import discriminator
from spectrostream_jax.models import quantizer as rvq
from spectrostream_jax.training import checkpoint
from spectrostream_jax.training import finetune
from spectrostream_jax.training import optim
from spectrostream_jax.training import sharding
from spectrostream_jax.training import step
from spectrostream_jax.training import train
from spectrostream_jax.training import trainable

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILE = {'xla_backend_optimization_level': 0}
DISC = discriminator.DiscriminatorConfig(
  windows=(64, 128),
  base_channels=4,
  channel_multipliers=(1, 2),
  strides=((1, 2), (1, 2)),
)
ADAM = optim.OptimizerConfig(learning_rate=1e-3)


def step_config(codec: codec_lib.CodecConfig, spec: str = 'all', **kwargs):
  return step.StepConfig(
    codec=codec,
    discriminator=dataclasses.replace(DISC, num_channels=codec.num_channels),
    generator_optimizer=ADAM,
    discriminator_optimizer=ADAM,
    trainable=spec,
    **kwargs,
  )


def flat(tree) -> dict[str, np.ndarray]:
  return weights.flatten(jax.device_get(tree))


def assert_bitwise(got, want, parts=('encoder', 'decoder', 'quantizer')):
  got, want = flat(got), flat(want)
  keys = [k for k in want if k.split('/')[0] in parts]
  assert keys
  for key in keys:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# Specs ----------------------------------------------------------------------


def test_trainable_specs():
  assert trainable.parse('all') == ()
  assert trainable.parse('encoder+decoder') == ('encoder', 'decoder')
  assert trainable.learns('decoder/decoder_6/conv/kernel', ('decoder',))
  assert not trainable.learns('decoders/x', ('decoder',))
  assert trainable.learns('anything', ())
  assert trainable.freezes_codes('decoder')
  assert trainable.freezes_codes('decoder/decoder_6+decoder/output_layer')
  for spec in ('all', 'encoder+decoder', 'quantizer+decoder'):
    assert not trainable.freezes_codes(spec)
  for bad in ('', 'decoder+', 'decoder//x', ' decoder'):
    with pytest.raises(trainable.SpecError, match="joined by '\\+'"):
      step_config(codec_lib.tiny(), bad)
  shapes = codec_lib.param_shapes(codec_lib.tiny())
  trainable.check(shapes, 'decoder/decoder_6+quantizer')
  with pytest.raises(
    trainable.SpecError, match="'decodr' names no codec parameter"
  ):
    trainable.check(shapes, 'decodr')


@pytest.mark.parametrize(
  'spec,learning',
  [
    ('all', ('encoder', 'decoder')),  # EMA codebooks never have moments.
    ('decoder', ('decoder',)),
    ('encoder+decoder', ('encoder', 'decoder')),
    ('decoder/decoder_6', ('decoder/decoder_6',)),
  ],
)
def test_frozen_parts_have_no_optimizer_state(spec, learning):
  config = step_config(codec_lib.tiny(), spec)
  state = jax.eval_shape(functools.partial(step.init_state, config), 0)
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  sizes = {k: v.size for k, v in weights.flat_paths(state.params).items()}
  trained = sum(
    n for k, n in sizes.items() if trainable.learns(k, tuple(learning))
  )
  assert 0 < trained < sum(sizes.values())
  assert moments == 2 * trained  # Adam's mu and nu.


# Loading --------------------------------------------------------------------


def fresh_state(
  config: step.StepConfig, rows_per_step: int, directory: str, devices=8
):
  """What the trainer does at step 0 of a run with init_from: a sharded
  fresh state (on 4 × 2 data × fsdp devices, or on one), then the
  directory's weights."""
  if devices == 8:
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
  else:
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
  init = functools.partial(step.init_state, config)
  shardings = sharding.tree_shardings(
    mesh, jax.eval_shape(init, 0), sharding.MeshConfig(min_fsdp_size=64)
  )
  state = (
    jax.jit(init, out_shardings=shardings).lower(0).compile(FAST_COMPILE)(0)
  )
  source = finetune.read_source(directory, config.codec)
  return (
    finetune.start_from(
      state, source, rows_per_step, config.codec.quantizer, shardings
    ),
    source,
    shardings,
  )


def check_loaded(state, shardings, directory: str, rows_per_step: int):
  found = model_dir.locate(directory)
  want = weights.load_official(
    found.encoder_path,
    found.soundstream_path,
    codec_lib.param_shapes(found.config),
  )
  assert_bitwise(state.params, want)
  assert_bitwise(state.ema_params, want)
  # The shardings the trainer asked for, fsdp-split leaves included.
  for got, sh in zip(
    jax.tree.leaves(state.params),
    jax.tree.leaves(shardings.params),
    strict=True,
  ):
    assert got.sharding == sh
  assert any(not sh.is_fully_replicated for sh in jax.tree.leaves(shardings))
  q = found.config.quantizer
  cb = jax.device_get(state.codebooks)
  assert bool(cb.initialized)
  np.testing.assert_array_equal(
    cb.counts, np.full(cb.counts.shape, rows_per_step / q.codebook_size)
  )
  np.testing.assert_allclose(
    cb.sums, want['quantizer']['embedding'] * cb.counts[..., None], rtol=1e-6
  )
  assert not cb.since_restart.any()


def test_loads_an_export_exactly(tiny_model_dir):
  config = step_config(codec_lib.tiny())
  state, source, shardings = fresh_state(config, 40, tiny_model_dir)
  check_loaded(state, shardings, tiny_model_dir, 40)
  assert source.model_id == Codec.load(tiny_model_dir).model_id
  assert source.codes_id == source.model_id
  assert int(state.step) == 0


def test_loads_official_files_exactly(parity_weights):
  """Google's two-file layout alone (the shared vectors' random weights)
  is the production preset."""
  config = step_config(codec_lib.production(), 'decoder')
  state, source, shardings = fresh_state(config, 4096, str(parity_weights))
  check_loaded(state, shardings, str(parity_weights), 4096)
  assert source.model_id == model_dir.files_model_id(
    str(parity_weights / weights.ENCODER_FILE),
    str(parity_weights / weights.SOUNDSTREAM_FILE),
  )


def test_another_model_is_one_line_naming_each_field(tiny_model_dir):
  other = dataclasses.replace(
    codec_lib.tiny(), lookahead=2, encoder_base_channels=2
  )
  with pytest.raises(finetune.SourceError) as e:
    finetune.read_source(tiny_model_dir, other)
  message = str(e.value)
  assert '\n' not in message
  assert (
    'encoder_base_channels (' in message and 'lookahead (1 vs 2)' in message
  )
  assert 'decoder_channels' not in message
  # How the codebooks learn, and the compute dtype, may change.
  knobs = dataclasses.replace(
    codec_lib.tiny(),
    dtype='bfloat16',
    quantizer=dataclasses.replace(
      codec_lib.tiny().quantizer, dead_code_fraction=0.5, ema_decay=0.9
    ),
  )
  finetune.read_source(tiny_model_dir, knobs)
  with pytest.raises(finetune.SourceError, match='no such model directory'):
    finetune.read_source(tiny_model_dir + '_nope', knobs)


@pytest.mark.slow
def test_cli_mismatch_is_one_line(tmp_path):
  """spectrostream-train with an init_from of another model: exit 1 and one
  line naming the fields, no traceback."""
  config = dataclasses.replace(codec_lib.tiny(), lookahead=2)
  model_dir.write(
    str(tmp_path / 'm'), Codec.random(config, seed=1).params, config
  )
  proc = subprocess.run(
    [
      str(pathlib.Path(sys.executable).with_name('spectrostream-train')),
      f'--workdir={tmp_path / "run"}',
      '--gin_file=experiments/quickstart.gin',
      f'--init_from={tmp_path / "m"}',
    ],
    cwd=REPO,
    env=dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=1',
    ),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  ours = [
    line
    for line in proc.stderr.splitlines()
    if not line.startswith(('I1', 'W1'))  # absl's info and warning lines
  ]
  assert len(ours) == 1, ours
  assert ours[0].startswith('spectrostream-train: error: init_from ')
  assert ours[0].endswith('lookahead (2 vs 1)')


# Frozen parts in the step ---------------------------------------------------


def batch() -> dict[str, np.ndarray]:
  clips = [
    synthetic.render(np.random.default_rng(s), 4 * 1920) for s in range(8)
  ]
  audio = np.stack([c / np.max(np.abs(c)) * 0.5 for c in clips])
  return {'audio': audio.astype(np.float32)}


def test_frozen_codebooks_get_no_ema_or_restarts(tiny_model_dir):
  """encoder+decoder: the codebooks and their statistics stay bit for bit
  while the encoder learns. 'all': the codebooks move, but the loaded
  usage counts keep every code alive (restarts would follow at once from
  zero counts, with the grace period off)."""
  quantizer = dataclasses.replace(
    codec_lib.tiny().quantizer, restart_grace_steps=0
  )
  codec = dataclasses.replace(codec_lib.tiny(), quantizer=quantizer)
  data = batch()
  rows = 8 * 4
  for spec in ('encoder+decoder', 'all'):
    config = step_config(codec, spec)
    state, _, shardings = fresh_state(config, rows, tiny_model_dir, 1)
    before = jax.device_get(state)
    train_step = (
      jax.jit(functools.partial(step.train_step, config))
      .lower(state, data)
      .compile(FAST_COMPILE)
    )
    after, metrics = train_step(state, data)
    after, metrics = jax.device_get((after, metrics))
    codebook = after.params['quantizer']['embedding']
    encoder_moved = not np.array_equal(
      flat(after.params)['encoder/base_conv_first/conv/kernel'],
      flat(before.params)['encoder/base_conv_first/conv/kernel'],
    )
    assert encoder_moved
    if spec == 'encoder+decoder':
      assert 'vq/restarts' not in metrics
      assert_bitwise(after.params, before.params, ('quantizer',))
      assert_bitwise(after.ema_params, before.params, ('quantizer',))
      for got, want in zip(
        jax.tree.leaves(after.codebooks),
        jax.tree.leaves(before.codebooks),
        strict=True,
      ):
        np.testing.assert_array_equal(got, want)
    else:
      assert int(metrics['vq/restarts']) == 0
      assert not np.array_equal(
        codebook, before.params['quantizer']['embedding']
      )
      # The same step from statistics that count every code unused.
      zero = rvq.CodebookState.create(quantizer).replace(
        initialized=np.ones((), bool)
      )
      state = state.replace(codebooks=jax.device_put(zero, shardings.codebooks))
      _, metrics = jax.device_get(train_step(state, data))
      assert int(metrics['vq/restarts']) > 0


# The trainer, end to end ----------------------------------------------------


def run_config(workdir: str, **kwargs) -> dict:
  """train()'s arguments: the tiny codec on synthetic clips of 3 frames."""
  audio = transforms.AudioConfig(crop_samples=4 * 1920)
  return dict(
    workdir=workdir,
    model=step_config(codec_lib.tiny()),
    data=pipeline.PipelineConfig(audio=audio, batch_size=8),
    eval_data=None,
    mesh=sharding.MeshConfig(),
    checkpoint=checkpoint.CheckpointConfig(every=25, best_metric=None),
    log_every=25,
    eval_every=0,
    eval_kbps=(0.6,),
    log_grad_norms=False,
    **kwargs,
  )


def test_decoder_only_finetune(tiny_model_dir, tmp_path, monkeypatch):
  """50 steps with trainable='decoder': encoder, codebooks and their
  statistics bitwise the source's, the decoder changed, the codes of a clip
  the source's; the export says codes_compatible_with the source, and a
  resume ignores a new init_from and keeps the record."""
  source = Codec.load(tiny_model_dir)
  workdir = str(tmp_path / 'run')
  state = train.train(
    num_steps=50,
    init_from=tiny_model_dir,
    trainable='decoder',
    **run_config(workdir),
  )
  state = jax.device_get(state)
  assert int(state.step) == 50 and int(state.skipped) == 0
  for params in (state.params, state.ema_params):
    assert_bitwise(params, source.params, ('encoder', 'quantizer'))
  # Untouched since loading: 8 clips × 4 embeddings a step, uniform use.
  assert bool(state.codebooks.initialized)
  np.testing.assert_array_equal(
    state.codebooks.counts, np.full(state.codebooks.counts.shape, 32 / 64)
  )
  _, model_id = export.export_workdir(
    workdir, str(tmp_path / 'model'), block_frames=(4,), platforms=('cpu',)
  )
  meta = json.loads((tmp_path / 'model' / 'config.json').read_text())
  assert meta['codes_compatible_with'] == source.model_id
  tuned = Codec.load(str(tmp_path / 'model'))
  assert tuned.codes_compatible_with == source.model_id
  assert tuned.model_id != source.model_id
  assert tuned.codes_id == source.model_id
  assert_bitwise(tuned.params, source.params, ('encoder', 'quantizer'))
  changed = [
    k
    for k, v in flat(tuned.params).items()
    if k.startswith('decoder/')
    and not np.array_equal(v, flat(source.params)[k])
  ]
  assert len(changed) > 10
  clip = batch()['audio'][:2]
  np.testing.assert_array_equal(tuned.encode(clip), source.encode(clip))

  # A resume with another init_from: ignored, said, the start kept.
  other = tmp_path / 'other'
  model_dir.write(
    str(other), Codec.random(codec_lib.tiny(), seed=9).params, codec_lib.tiny()
  )
  args = run_config(workdir)
  config = dataclasses.replace(args['model'], trainable='decoder')
  init = functools.partial(step.init_state, config)
  abstract = jax.eval_shape(init, 0)
  shardings = sharding.tree_shardings(
    sharding.make_mesh(args['mesh']), abstract, args['mesh']
  )
  abstract = jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
    abstract,
    shardings,
  )
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, 'checkpoints'), args['checkpoint']
  )
  # absl's handlers differ between pytest runs: record the calls instead.
  warnings = []
  monkeypatch.setattr(
    train.logging, 'warning', lambda msg, *a: warnings.append(msg % a)
  )
  try:
    with pytest.raises(
      trainable.SpecError, match="trains 'decoder'; resume it with the same"
    ):
      train.start_or_resume(
        ckpt,
        abstract,
        None,
        lambda: pytest.fail('a resume made a fresh state'),
        args['model'],
        None,
        rows_per_step=32,
      )
    resumed, step_, start = train.start_or_resume(
      ckpt,
      abstract,
      iter(pipeline.make_dataset(args['data'])),
      lambda: pytest.fail('a resume made a fresh state'),
      config,
      str(other),
      rows_per_step=32,
    )
  finally:
    ckpt.close()
  assert step_ == 50
  assert_bitwise(resumed.params, state.params)
  (warning,) = warnings
  assert f'init_from={other} is ignored' in warning
  assert f'started from {tiny_model_dir}' in warning
  assert start['model_id'] == source.model_id
  record = train.run_record(config, args['data'], start)
  assert record['codes_compatible_with'] == source.model_id


@pytest.mark.parametrize(
  'spec,shares',
  [('decoder', True), ('decoder/decoder_6', True), ('all', False)]
  + [('encoder+decoder', False), ('quantizer+decoder', False)],
)
def test_only_a_frozen_encoder_and_codebooks_share_codes(spec, shares):
  """The record export reads: codes_compatible_with is the source's codes
  id exactly when nothing that makes the codes learns."""
  model = step_config(codec_lib.tiny(), spec)
  data = pipeline.PipelineConfig()
  start = {'path': '/m', 'model_id': 'a' * 64, 'codes_id': 'b' * 64}
  record = train.run_record(model, data, start)
  assert record['init_from'] == start
  assert record['codes_compatible_with'] == ('b' * 64 if shares else None)
  assert train.run_record(model, data, None)['codes_compatible_with'] is None


# Sharing codes --------------------------------------------------------------


def test_a_decoder_finetune_reads_its_sources_files(tiny_model_dir, tmp_path):
  """.sps files carry the codes' model id: the source's and a decoder
  fine-tune's files decode with either; an unrelated model refuses them."""
  source = Codec.load(tiny_model_dir)
  params = jax.tree.map(np.asarray, source.params)
  params['decoder'] = jax.tree.map(lambda x: x * 1.01, params['decoder'])
  tuned_dir = tmp_path / 'tuned'
  model_dir.write(
    str(tuned_dir), params, source.config, codes_compatible_with=source.model_id
  )
  tuned = Codec.load(str(tuned_dir))
  assert tuned.reads_codes_of(source.model_id)
  assert not source.reads_codes_of(tuned.model_id)
  stranger = Codec.random(codec_lib.tiny(), seed=11)
  rng = np.random.default_rng(0)
  wav = tmp_path / 'in.wav'
  sf.write(wav, 0.1 * rng.standard_normal((48_000, 2)), 48_000)
  for maker in (source, tuned):
    sps = tmp_path / 'x.sps'
    cli.encode_file(maker, wav, sps, levels=4, block_frames=10)
    assert bitstream.read_header(sps).model_id.hex() == source.model_id
    for reader in (source, tuned):
      cli.decode_file(reader, sps, tmp_path / 'y.wav', block_frames=10)
    with pytest.raises(bitstream.BitstreamError, match='another model'):
      cli.decode_file(stranger, sps, tmp_path / 'z.wav', block_frames=10)

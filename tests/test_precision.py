"""The precision policy (docs/precision.md), read from the StableHLO.

conftest.py sets JAX's default matmul precision to 'highest' for every
test; these tests set it to 'bfloat16' around each lowering, so a program
that is not traced under the policy shows DEFAULT ops.
"""

import dataclasses

import jax
import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax import Codec
from spectrostream_jax import cli
from spectrostream_jax import export
from spectrostream_jax import lowering
from spectrostream_jax import precision
from spectrostream_jax import streaming
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.training import step
from spectrostream_jax.training import train

FRAMES = 4


@pytest.fixture(scope='module')
def codec():
  return Codec.random(codec_lib.tiny(), seed=3)


def wav(frames=FRAMES):
  return jax.ShapeDtypeStruct((1, frames * 1920, 2), np.float32)


def codes(c: Codec, frames=FRAMES):
  return jax.ShapeDtypeStruct((1, frames, c.num_levels), np.int32)


def products(text: str) -> int:
  return sum(
    line.count('stablehlo.convolution') + line.count('stablehlo.dot_general')
    for line in text.splitlines()
    if not line.startswith('#loc')
  )


def codec_programs(c: Codec) -> dict[str, str]:
  """StableHLO of every program `c` jits, lowered at a lax ambient setting."""
  emb = jax.ShapeDtypeStruct((1, FRAMES, c.config.embedding_dim), np.float32)
  with jax.default_matmul_precision('bfloat16'):
    return {
      'embed': c._embed.lower(c.params, wav()).as_text(),
      'encode': c._encode.lower(c.params, wav(), c.num_levels).as_text(),
      'decode': c._decode.lower(c.params, codes(c)).as_text(),
      'decode_embeddings': c._decode_emb.lower(c.params, emb).as_text(),
    }


def streaming_programs(c: Codec) -> dict[str, str]:
  cfg, w = c.compute_config, c.streaming_weights
  window = jax.ShapeDtypeStruct((1, 1920 + cfg.hop_length, 2), np.float32)
  enc_state = streaming.init_encoder_state(cfg, w)
  dec_state = streaming.init_decoder_state(cfg, w)
  with jax.default_matmul_precision('bfloat16'):
    return {
      'encode_step': streaming.encode_step.lower(
        cfg, w, enc_state, window, c.num_levels, c.precision
      ).as_text(),
      'decode_step': streaming.decode_step.lower(
        cfg, w, dec_state, codes(c, 1), c.precision
      ).as_text(),
    }


def test_codec_programs_ask_for_float32(codec):
  for name, text in codec_programs(codec).items():
    assert products(text) > 10, name
    assert lowering.precision_problems(text) == [], name


def test_streaming_steps_ask_for_float32(codec):
  for name, text in streaming_programs(codec).items():
    assert products(text) > 10, name
    assert lowering.precision_problems(text) == [], name


def test_exported_artifacts_ask_for_float32(codec, tmp_path):
  with jax.default_matmul_precision('bfloat16'):
    export.export_model(
      codec, str(tmp_path / 'm'), block_frames=(FRAMES,), platforms=('cuda',)
    )
  files = sorted((tmp_path / 'm' / export.STABLEHLO_DIR).glob('*.jaxexport'))
  assert [f.name for f in files] == ['decode_4.jaxexport', 'encode_4.jaxexport']
  for f in files:
    text = jax.export.deserialize(f.read_bytes()).mlir_module()
    assert products(text) > 10, f.name
    assert lowering.precision_problems(text) == [], f.name


def test_exports_float32_from_a_bfloat16_trained_config(tmp_path):
  config = codec_lib.tiny()
  bf16 = dataclasses.replace(config, dtype='bfloat16')
  c = Codec(Codec.random(config, seed=3).params, bf16)
  assert c.compute_config.dtype == 'float32'
  functions = export._exported_functions(c, [FRAMES], ['cpu'])
  for _, _, exported in functions.values():
    text = exported.mlir_module()
    assert products(text) > 10
    assert 'bf16' not in text


def test_the_opt_ins_ask_for_less(codec):
  tf32 = Codec(codec.params, codec.config, precision='tensorfloat32')
  text = codec_programs(tf32)['decode']
  problems = lowering.precision_problems(text)
  # Every product of the decoder network, none left at full precision.
  assert len(problems) == products(text)
  assert all(' at HIGH, HIGH (line' in p for p in problems)

  bf16 = Codec(codec.params, codec.config, precision='bfloat16')
  assert bf16.compute_config.dtype == 'bfloat16'
  text = codec_programs(bf16)['encode']
  assert 'xbf16>) -> tensor<' in text
  # The RVQ's distances stay full float32 products.
  assert 'f32>) -> tensor<1x4x64xf32>' in text


def test_cpu_codes_and_audio_are_the_same_at_every_mode(codec):
  x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, FRAMES * 1920, 2))
  x = x.astype(np.float32)
  out = {}
  for mode in ('float32', 'tensorfloat32'):
    c = Codec(codec.params, codec.config, precision=mode)
    out[mode] = (c.encode(x), c.reconstruct(x))
  np.testing.assert_array_equal(out['float32'][0], out['tensorfloat32'][0])
  np.testing.assert_array_equal(out['float32'][1], out['tensorfloat32'][1])


def test_the_policy_overrides_a_cached_trace(codec):
  """A program traced under another ambient setting is not reused."""
  c = Codec(codec.params, codec.config)
  with jax.default_matmul_precision('bfloat16'):
    a = c._decode.lower(c.params, codes(c)).as_text()
  with jax.default_matmul_precision('highest'):
    b = c._decode.lower(c.params, codes(c)).as_text()
  assert lowering.precision_problems(a) == lowering.precision_problems(b) == []


@pytest.mark.parametrize('mode', ['tf32', 'highest', None, 32])
def test_bad_modes(codec, mode):
  with pytest.raises(ValueError, match=r'^precision must be one of float32'):
    Codec(codec.params, codec.config, precision=mode)
  with pytest.raises(ValueError, match=r'^precision must be one of float32'):
    step.StepConfig(matmul_precision=mode)
  with pytest.raises(ValueError, match=r'^precision must be one of float32'):
    precision.products(mode)


def test_precision_problems_reads_both_spellings():
  conv = (
    '%0 = stablehlo.convolution(%a, %b) dim_numbers = [b, 0, 1, f]x[0, 1, '
    'i, o]->[b, 0, 1, f], window = {{stride = [1, 1]}} {{batch_group_count '
    '= 1 : i64, feature_group_count = 1 : i64{}}} : (tensor<1xf32>) -> '
    'tensor<1xf32>'
  )
  dot = (
    '%1 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0]{} : '
    '(tensor<2x2xf32>, tensor<2x2xf32>) -> tensor<2x2xf32>'
  )
  high = '#stablehlo<precision HIGHEST>'
  text = '\n'.join(
    [
      conv.format(f', precision_config = [{high}, {high}]'),
      dot.format(', precision = [HIGHEST, HIGHEST]'),
      conv.format(''),
      dot.format(', precision = [HIGHEST, DEFAULT]'),
      conv.format(
        ', precision_config = [#stablehlo<precision HIGH>, '
        '#stablehlo<precision HIGH>]'
      ),
      dot.format(''),
    ]
  )
  assert lowering.precision_problems(text) == [
    'stablehlo.convolution at DEFAULT (line 3)',
    'stablehlo.dot_general at HIGHEST, DEFAULT (line 4)',
    'stablehlo.convolution at HIGH, HIGH (line 5)',
    'stablehlo.dot_general at DEFAULT (line 6)',
  ]


def test_train_step_follows_its_config():
  config = step.StepConfig(codec=codec_lib.tiny())
  state = jax.eval_shape(lambda: step.init_state(config, 0))
  batch = {'audio': jax.ShapeDtypeStruct((1, 4 * 1920, 2), np.float32)}
  texts = {}
  for mode in ('float32', 'tensorfloat32'):
    cfg = step.StepConfig(codec=codec_lib.tiny(), matmul_precision=mode)
    program = jax.jit(step.train_step, static_argnums=(0, 3, 4))
    with jax.default_matmul_precision('bfloat16'):
      texts[mode] = program.lower(cfg, state, batch, None, True).as_text()
  assert products(texts['float32']) > 10
  assert lowering.precision_problems(texts['float32']) == []
  problems = lowering.precision_problems(texts['tensorfloat32'])
  assert problems and all(' at HIGH, HIGH (line' in p for p in problems)


@pytest.mark.parametrize(
  'hardware,mode',
  [
    (None, 'float32'),
    ('hardware/cpu.gin', 'float32'),
    ('hardware/gpu8.gin', 'tensorfloat32'),
    ('hardware/tpu_pod.gin', 'bfloat16'),
  ],
)
def test_gin_binds_and_records_the_training_precision(hardware, mode):
  import gin

  gin.clear_config()
  try:
    files = ['experiments/production_debian.gin'] + (
      [hardware] if hardware else []
    )
    train.parse_gin(files, [])
    model = gin.query_parameter('train.model').scoped_configurable_fn()
    assert model.matmul_precision == mode
    assert f"StepConfig.matmul_precision = '{mode}'" in (
      gin.operative_config_str()
    )
  finally:
    gin.clear_config()


def test_cli_precision_reaches_the_codec(
  tiny_model_dir, tmp_path, monkeypatch, capsys
):
  loaded = []

  def load(model_dir, mode):
    loaded.append(mode)
    raise ValueError('stop here')

  monkeypatch.setattr(cli.Codec, 'load', load)
  wav, sps = tmp_path / 'in.wav', tmp_path / 'in.sps'
  sf.write(wav, np.zeros((480, 2), np.float32), 48_000)
  sps.write_bytes(b'')
  for command, paths in (
    ('encode', [wav, tmp_path / 'out.sps']),
    ('decode', [sps, tmp_path / 'out.wav']),
    ('demo', [wav]),
  ):
    for extra in ([], ['--precision', 'bfloat16']):
      args = [command, '--model', tiny_model_dir, *extra, *map(str, paths)]
      assert cli.main(args) == 1
      assert 'stop here' in capsys.readouterr().err
  assert loaded == ['float32', 'bfloat16'] * 3
  with pytest.raises(SystemExit) as exit_:
    cli.main(['encode', '--model', 'm', '--precision', 'tf32', 'a', 'b'])
  assert exit_.value.code == 2
  assert "invalid choice: 'tf32'" in capsys.readouterr().err

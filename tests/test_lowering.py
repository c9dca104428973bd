"""Every program lowers for TPU and GPU: no host callback, no float64.

The run's programs (`train.jit_programs`: the GAN and warm-up steps with
their donated state, k-means, the gradient diagnostics, the in-loop eval),
`Codec.encode` / `decode` and the streaming steps are traced on abstract
meshes of pod shapes (4 × 8 and 16 × 16 data × fsdp) for the small and the
production experiments and lowered to StableHLO for 'tpu' and 'cuda' on
this CPU-only machine. A program fails if its module holds a host callback
or transfer, a float64 value or a custom call the platform lacks, or if
the shardings and donation of its arguments are not the ones
`training/sharding.py` intends. The last tests show that a step with a
`jax.debug.callback` or a float64 op added is refused. Nothing is compiled
(docs/training.md, "Lowering for TPU and GPU").
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import gin
from spectrostream_jax import inference
from spectrostream_jax import lowering
from spectrostream_jax import streaming
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.training import sharding
from spectrostream_jax.training import step
from spectrostream_jax.training import train

PLATFORMS = ('tpu', 'cuda')
MESHES = {'4x8': (4, 8), '16x16': (16, 16)}
# The production model as a pod trains it (tpu_pod.gin and gpu8.gin bind
# the same model: bf16 compute), and the small one in float32.
EXPERIMENTS = {
  'small': ('experiments/small_debian.gin',),
  'production': ('experiments/production_debian.gin', 'hardware/tpu_pod.gin'),
}
PRESETS = {'small': codec_lib.small, 'production': codec_lib.production}
# Chips per host of a TPU pod: the process count the trainer sees.
CHIPS_PER_HOST = 4
# The run's programs that take the train state (all but the eval).
STATE_PROGRAMS = (
  'train_step',
  'warmup_step',
  'init_codebooks',
  'gradient_norms',
  'warmup_norms',
)
# Those that donate it: the name of the result that returns it.
DONATING = {
  'train_step': 'result[0]',
  'warmup_step': 'result[0]',
  'init_codebooks': 'result',
}


@pytest.fixture(scope='module', autouse=True)
def forget_at_the_end():
  """Drops the cached traces and codecs (hundreds of MB) after this file."""
  yield
  for cached in (experiment, abstract_state, run, traced, codec):
    cached.cache_clear()


class Experiment(NamedTuple):
  model: step.StepConfig
  mesh: sharding.MeshConfig
  batch_size: int
  eval_batch_size: int
  crop: int
  eval_kbps: tuple[float, ...]
  audio_examples: int


@functools.cache
def experiment(name: str) -> Experiment:
  """What `spectrostream-train` builds from the experiment's gin files."""
  gin.clear_config()
  try:
    train.parse_gin(list(EXPERIMENTS[name]), [])
    built = {
      key: gin.query_parameter(f'train.{key}').scoped_configurable_fn()
      for key in ('model', 'data', 'eval_data', 'mesh')
    }
    return Experiment(
      model=built['model'],
      mesh=built['mesh'],
      batch_size=built['data'].batch_size,
      eval_batch_size=built['eval_data'].batch_size,
      crop=built['data'].audio.crop_samples,
      eval_kbps=tuple(gin.query_parameter('train.eval_kbps')),
      audio_examples=gin.query_parameter('train.audio_examples'),
    )
  finally:
    gin.clear_config()


@functools.cache
def abstract_state(name: str):
  model = experiment(name).model
  return jax.eval_shape(functools.partial(step.init_state, model), 0)


class Run(NamedTuple):
  state_sharding: Any
  batch_sharding: NamedSharding
  args: dict[str, tuple]  # program -> abstract arguments
  programs: train.Programs


def pod_batch(batch_size: int, devices: int) -> int:
  """The experiment's batch, rounded up to a whole number per device."""
  return devices * math.ceil(batch_size / devices)


@functools.cache
def run(name: str, mesh_name: str) -> Run:
  """The trainer's programs and arguments on an abstract pod mesh."""
  exp = experiment(name)
  shape = MESHES[mesh_name]
  config = dataclasses.replace(exp.mesh, data=shape[0], fsdp=shape[1])
  mesh = AbstractMesh(shape, sharding.AXES, axis_types=(AxisType.Auto,) * 2)
  abstract = abstract_state(name)
  state_sharding = sharding.tree_shardings(mesh, abstract, config)
  levels = [exp.model.codec.levels_for_kbps(k) for k in exp.eval_kbps]
  programs = train.jit_programs(
    exp.model,
    mesh,
    mesh.size // CHIPS_PER_HOST,
    state_sharding,
    levels,
    exp.audio_examples,
  )

  def audio(batch_size):
    size = pod_batch(batch_size, mesh.size)
    channels = exp.model.codec.num_channels
    shape = (size, exp.crop, channels)
    return {'audio': jax.ShapeDtypeStruct(shape, jnp.float32)}

  args = {p: (abstract, audio(exp.batch_size)) for p in STATE_PROGRAMS}
  args['evaluate'] = (abstract.ema_params, audio(exp.eval_batch_size))
  return Run(state_sharding, sharding.batch_sharding(mesh), args, programs)


@functools.lru_cache(maxsize=1)
def traced(name: str, mesh_name: str, program: str) -> jax.stages.Traced:
  """One trace serves both platforms (the cases are ordered for it)."""
  r = run(name, mesh_name)
  return getattr(r.programs, program).trace(*r.args[program])


def intended_arguments(r: Run, program: str) -> dict[str, Any]:
  """{argument name: sharding} as sharding.py and train.py mean them."""
  if program == 'evaluate':
    out = lowering.named_shardings('params', r.state_sharding.ema_params)
  else:
    out = lowering.named_shardings('state', r.state_sharding)
  out["batch['audio']"] = r.batch_sharding
  return out


# Each GAN step and eval on both meshes; the programs that run once (k-means)
# or every few hundred steps (warm-up, diagnostics) on the larger mesh.
RUN_CASES = [
  (program, name, mesh_name, platform)
  for program in (*STATE_PROGRAMS, 'evaluate')
  for name in EXPERIMENTS
  for mesh_name in MESHES
  for platform in PLATFORMS
  if program in ('train_step', 'evaluate')
  or mesh_name == '16x16'
  and (name == 'production' or program in ('warmup_step', 'init_codebooks'))
]
# What a program must read: the parameters and, where it returns them,
# the optimizer state. JAX prunes the arguments a program does not read:
# the GAN step overwrites the EMA codebooks, k-means the codebooks, and
# the warm-up's diagnostics bypass them.
NETWORKS = ("state.params['encoder']", "state.params['decoder']")
READS = {
  'train_step': ('state.params', 'state.opt_state'),
  'warmup_step': ('state.params', 'state.opt_state'),
  'init_codebooks': (*NETWORKS, 'state.opt_state'),
  'gradient_norms': ('state.params',),
  'warmup_norms': NETWORKS,
  'evaluate': ('params',),
}


@pytest.mark.parametrize('program, name, mesh_name, platform', RUN_CASES)
def test_run_program_lowers(program, name, mesh_name, platform):
  r = run(name, mesh_name)
  text = lowering.checked_stablehlo(traced(name, mesh_name, program), platform)
  args, results = lowering.main_signature(text)
  intended = intended_arguments(r, program)
  reads = READS[program]
  assert [n for n in intended if n.startswith(reads) and n not in args] == []
  intended = {n: s for n, s in intended.items() if n in args}
  assert lowering.sharding_mismatches(args, intended) == []
  if program in DONATING:
    # The state is donated and comes back sharded as it went in.
    assert all(args[n].donated for n in intended if n.startswith('state'))
    assert not args["batch['audio']"].donated
    returned = lowering.named_shardings(DONATING[program], r.state_sharding)
    assert lowering.sharding_mismatches(results, returned) == []
  # Not vacuous: parameters and Adam moments are split over fsdp, small
  # leaves replicated, the batch over both axes.
  axes = {n: args[n].axes for n in intended}
  for group in reads:
    names = [n for n in axes if n.startswith(group)]
    assert any(('fsdp',) in axes[n] for n in names), group
    assert any(all(a == () for a in axes[n]) for n in names), group
  assert axes["batch['audio']"][0] == sharding.BATCH_AXES


# Codec and streaming --------------------------------------------------------

INFERENCE_CASES = [
  (name, platform) for name in PRESETS for platform in PLATFORMS
]
BLOCK_FRAMES = 50  # export.py's 2 s blocks


@functools.lru_cache(maxsize=1)
def codec(name: str) -> inference.Codec:
  """A Codec of zeros: its jitted functions are what matters here."""
  config = PRESETS[name]()
  zeros = jax.tree.map(
    lambda s: np.zeros(s.shape, s.dtype), codec_lib.param_shapes(config)
  )
  return inference.Codec(zeros, config)


@pytest.mark.parametrize('name, platform', INFERENCE_CASES)
def test_codec_encode_and_decode_lower(name, platform):
  c = codec(name)
  config = c.config
  params = jax.eval_shape(lambda p: p, c.params)
  wav = jax.ShapeDtypeStruct(
    (1, BLOCK_FRAMES * config.samples_per_frame, config.num_channels),
    jnp.float32,
  )
  codes = jax.ShapeDtypeStruct(
    (1, BLOCK_FRAMES, config.quantizer.num_levels), jnp.int32
  )
  # The functions Codec.encode and Codec.decode run.
  for fn, args in (
    (c._encode, (params, wav, config.quantizer.num_levels)),
    (c._decode, (params, codes)),
  ):
    lowering.checked_stablehlo(fn.trace(*args), platform)


@pytest.mark.parametrize('name, platform', INFERENCE_CASES)
def test_streaming_steps_lower(name, platform):
  config = PRESETS[name]()
  params = codec_lib.param_shapes(config)
  weights = jax.eval_shape(
    functools.partial(streaming.prepare_weights, config), params
  )
  levels = config.quantizer.num_levels
  # Real time: one code frame per step.
  window = jax.ShapeDtypeStruct(
    (1, config.samples_per_frame + config.hop_length, config.num_channels),
    jnp.float32,
  )
  codes = jax.ShapeDtypeStruct((1, 1, levels), jnp.int32)
  encoder_state = jax.eval_shape(
    lambda w: streaming.init_encoder_state(config, w), weights
  )
  decoder_state = jax.eval_shape(
    lambda w: streaming.init_decoder_state(config, w), weights
  )
  for fn, args in (
    (streaming.encode_step, (config, weights, encoder_state, window, levels)),
    (streaming.decode_step, (config, weights, decoder_state, codes)),
  ):
    text = lowering.checked_stablehlo(fn.trace(*args), platform)
    values, _ = lowering.main_signature(text)
    state = [v for n, v in values.items() if n.startswith('state')]
    assert state and all(v.donated for v in state)


# The checks themselves ------------------------------------------------------


def negative_case(monkeypatch, change) -> jax.stages.Traced:
  """The small experiment's GAN step with `change(metrics)` added to it."""
  real_step = step.train_step

  def changed_step(*args, **kwargs):
    state, metrics = real_step(*args, **kwargs)
    return state, change(metrics)

  monkeypatch.setattr(step, 'train_step', changed_step)
  run.cache_clear()
  try:
    r = run('small', '4x8')
    return r.programs.train_step.trace(*r.args['train_step'])
  finally:
    run.cache_clear()


def test_a_host_callback_in_the_step_is_refused(monkeypatch):
  def change(metrics):
    jax.debug.callback(print, metrics['g/total'])
    return metrics

  traced_step = negative_case(monkeypatch, change)
  for platform in PLATFORMS:
    with pytest.raises(lowering.LoweringError) as error:
      lowering.checked_stablehlo(traced_step, platform)
    assert 'host callback: debug_callback at' in str(error.value)
    assert 'test_lowering.py' in str(error.value)
  # Only CPU can lower it here; the module check finds it there.
  text = lowering.stablehlo(traced_step, 'cpu')
  found = lowering.module_problems(text, 'tpu')
  assert any(
    'host callback: custom_call @xla_ffi_python_cpu' in p for p in found
  )


def test_a_float64_op_in_the_step_is_refused(monkeypatch):
  def change(metrics):
    with jax.enable_x64(True):
      total = metrics['g/total'].astype(jnp.float64) * 0.5
      total = (total * 2).astype(jnp.float32)
    return {**metrics, 'g/total': total}

  traced_step = negative_case(monkeypatch, change)
  problems = lowering.jaxpr_problems(traced_step.jaxpr)
  assert any(
    p.startswith('float64 value: convert_element_type') for p in problems
  )
  for platform in PLATFORMS:
    found = lowering.module_problems(
      lowering.stablehlo(traced_step, platform), platform
    )
    assert any(p.startswith('float64 type: stablehlo.convert') for p in found)
    with pytest.raises(lowering.LoweringError, match='float64'):
      lowering.checked_stablehlo(traced_step, platform)


BAD_LINES = {
  'gpu_callback': (
    '%0 = stablehlo.custom_call @xla_python_gpu_callback(%a) '
    '{has_side_effect = true} : (tensor<f32>) -> tensor<f32>',
    'host callback: custom_call @xla_python_gpu_callback',
  ),
  'tpu_callback_send': (
    '%1 = "stablehlo.send"(%a, %t) <{is_host_transfer = true}> : '
    '(tensor<f32>, !stablehlo.token) -> !stablehlo.token',
    'host transfer: stablehlo.send',
  ),
  'outfeed': (
    '%2 = "stablehlo.outfeed"(%a, %t) : (tensor<f32>, !stablehlo.token) '
    '-> !stablehlo.token',
    'host transfer: stablehlo.outfeed',
  ),
  'side_effect': (
    '%3 = stablehlo.custom_call @my_logger(%a) {has_side_effect = true} '
    ': (tensor<f32>) -> tensor<f32>',
    'side-effecting custom_call @my_logger (a host transfer?)',
  ),
  'lapack': (
    '%4:2 = stablehlo.custom_call @lapack_sgetrf_ffi(%a) : '
    '(tensor<4x4xf32>) -> (tensor<4x4xf32>, tensor<4xi32>)',
    'custom_call @lapack_sgetrf_ffi: CPU-only, not allowed on tpu',
  ),
  'unknown_target': (
    '%5 = "stablehlo.custom_call"(%a) {call_target_name = "mystery"} : '
    '(tensor<f32>) -> tensor<f32>',
    'custom_call @mystery: unknown, not allowed on tpu',
  ),
  'f64_constant': (
    '%6 = stablehlo.constant dense<1.0> : tensor<f64>',
    'float64 type: stablehlo.constant',
  ),
  'c128_fft': (
    '%7 = stablehlo.fft %a, type = FFT, length = [8] : '
    '(tensor<2x8xcomplex<f64>>) -> tensor<2x8xcomplex<f64>>',
    'float64 type: stablehlo.fft',
  ),
}
CLEAN_LINES = {
  'sharding': (
    '%0 = stablehlo.custom_call @Sharding(%a) {mhlo.sharding = '
    '"{replicated}"} : (tensor<8xf32>) -> tensor<8xf32>'
  ),
  # A name is not an op or a type.
  'f64_in_a_name': (
    '%1 = stablehlo.add %a, %b : tensor<4xf32> loc("params[\'f64\']")'
  ),
  'location_alias': (
    '#loc3 = loc("jit(f)/custom_call @xla_python_cpu_callback")'
  ),
}


@pytest.mark.parametrize('kind', BAD_LINES)
def test_module_problems_of_each_kind(kind):
  line, problem = BAD_LINES[kind]
  assert lowering.module_problems(line, 'tpu') == [f'{problem} (line 1)']


@pytest.mark.parametrize('kind', CLEAN_LINES)
def test_module_problems_passes_clean_lines(kind):
  assert lowering.module_problems(CLEAN_LINES[kind], 'cuda') == []


def test_sharding_check_sees_a_wrong_sharding():
  mesh = AbstractMesh((4, 8), sharding.AXES, axis_types=(AxisType.Auto,) * 2)
  split = NamedSharding(mesh, P(None, 'fsdp'))
  fn = jax.jit(
    lambda x: {'y': x['w'] * 2}, in_shardings=split, donate_argnums=0
  )
  x = jax.ShapeDtypeStruct((4, 64), jnp.float32)
  text = lowering.checked_stablehlo(fn.trace({'w': x}), 'tpu')
  args, results = lowering.main_signature(text)
  assert args["x['w']"].donated
  assert lowering.sharding_mismatches(args, {"x['w']": split}) == []
  assert lowering.sharding_mismatches(args, {"x['w']": P()}) == [
    "x['w']: module [{}, {fsdp}], intended [{}, {}]"
  ]
  assert lowering.sharding_mismatches(results, {'z': P()}) == [
    'z: not in the module'
  ]

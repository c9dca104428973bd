"""The collectives of the trainer's programs: their order, and what they move.

Every program of a run issues its collectives in one order on all devices.

XLA:CPU does not order a collective inside a loop body or a conditional
branch against the program's other collectives, and gloo, which carries
the collectives of several CPU processes, matches messages by arrival
order only: two devices that run two collectives in different orders
abort the run ("Received data size doesn't match expected size"). So no
program of the trainer may hold a collective outside its entry
computation (docs/training.md, "Collectives and the order of programs").
Checked on the compiled programs of a 4 × 2 (data × fsdp) mesh of 8 fake
devices, as two processes would see them, with every parameter that can
be split over 'fsdp' split.

And every device computes on its own examples only: no collective moves
a tensor with the whole batch (XLA's partitioner gathers the batch for
every FFT unless the transforms run under `shard_map`), on meshes 8 × 1
and 4 × 2. Parameters, gradients and metrics have no batch axis; the
example-order all-to-all moves the batch in two halves.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectrostream_jax import losses
from spectrostream_jax import signal
from spectrostream_jax.models import codec
from spectrostream_jax.models import discriminator
from spectrostream_jax.training import sharding
from spectrostream_jax.training import step
from spectrostream_jax.training import train

FAST_COMPILE = {'xla_backend_optimization_level': 0}
MODEL = step.StepConfig(
  codec=codec.tiny(),
  discriminator=discriminator.DiscriminatorConfig(
    windows=(64, 128),
    base_channels=4,
    channel_multipliers=(1, 2),
    strides=((1, 2), (1, 2)),
  ),
)
MESH = sharding.MeshConfig(data=4, fsdp=2, min_fsdp_size=1)
DATA_ONLY = sharding.MeshConfig(data=8, fsdp=1, min_fsdp_size=1)
# Three examples per device; no other axis of these programs has 24 entries.
BATCH, CROP = 24, 4 * 1920
# The warm-up step gathers every example's embeddings into the k-means
# buffer, which every device holds whole.
EMBEDDINGS = (
  f'f32[{BATCH},{MODEL.codec.num_embeddings(CROP)},{MODEL.codec.embedding_dim}]'
)
WHOLE_BATCH_ALLOWED = {'warmup_step': [f'all-gather {EMBEDDINGS}']}


@functools.cache
def jitted_programs(model, mesh_config=MESH):
  mesh = sharding.make_mesh(mesh_config)
  abstract = jax.eval_shape(functools.partial(step.init_state, model), 0)
  shardings = sharding.tree_shardings(mesh, abstract, mesh_config)
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    abstract,
    shardings,
  )
  batch = {
    'audio': jax.ShapeDtypeStruct(
      (BATCH, CROP, 2), jnp.float32, sharding=sharding.batch_sharding(mesh)
    )
  }
  jitted = train.jit_programs(
    model, mesh, 2, shardings, levels=[2, 8], audio_examples=1
  )
  return jitted, abstract, batch


@functools.cache
def compiled_program(model, name, mesh_config=MESH):
  jitted, abstract, batch = jitted_programs(model, mesh_config)
  state = abstract.ema_params if name == 'evaluate' else abstract
  return getattr(jitted, name).lower(state, batch).compile(FAST_COMPILE)


def check(model, name):
  compiled = compiled_program(model, name)
  text = compiled.as_text()
  # The programs do communicate (the RVQ statistics, the gradients, ...).
  assert sharding._COLLECTIVE.search(text), name
  assert sharding.nested_collectives(text) == []
  # Several CPU processes refuse a program that breaks the rule; this one
  # passes (a no-op with one process, as here).
  train.check_collective_order(compiled, name)


@pytest.mark.parametrize('name', train.Programs._fields)
def test_no_collective_inside_loops_or_conditionals(name):
  check(MODEL, name)


BALANCED = dataclasses.replace(
  MODEL, loss=dataclasses.replace(MODEL.loss, balancer=True)
)


def test_balanced_train_step_keeps_the_rule_too():
  check(BALANCED, 'train_step')


@pytest.mark.parametrize('mesh_config', [DATA_ONLY, MESH], ids=['8x1', '4x2'])
@pytest.mark.parametrize('name', train.Programs._fields)
def test_every_device_transforms_only_its_own_examples(name, mesh_config):
  text = compiled_program(MODEL, name, mesh_config).as_text()
  found = sharding.batch_collectives(text, BATCH)
  assert found == WHOLE_BATCH_ALLOWED.get(name, []), f'{len(found)} found'


def test_balanced_train_step_keeps_the_batch_split_too():
  text = compiled_program(BALANCED, 'train_step').as_text()
  assert sharding.batch_collectives(text, BATCH) == []


def test_batch_collectives_reads_result_types():
  hlo = """
  %ag = f32[24,2,16,960]{3,2,1,0} all-gather(f32[3,2,16,960] %p), dims={0}
  %ar = f32[7,7,24]{2,1,0} all-reduce(f32[7,7,24] %g), to_apply=%sum
  %s = (f32[3,4]{1,0}, c64[24,4]{1,0}) all-gather-start(f32[3,4] %q)
  %d = c64[24,4]{1,0} all-gather-done(%s)
  %rs = f32[240,4]{1,0} reduce-scatter(f32[1920,4] %x), dimensions={0}
  %f = c64[24,2,481]{2,1,0} fft(f32[24,2,960] %ag), fft_type=RFFT
  """
  assert sharding.batch_collectives(hlo, 24) == [
    'all-gather f32[24,2,16,960]',
    'all-reduce f32[7,7,24]',
    'all-gather c64[24,4]',
  ]


def test_per_device_transforms_give_the_same_numbers():
  """The shard-local transforms compute what the whole-batch ones do."""
  split = sharding.batch_sharding(sharding.make_mesh(DATA_ONLY))
  rng = np.random.default_rng(0)
  ref, rec = (
    jax.device_put(rng.uniform(-0.5, 0.5, (8, CROP, 2)), split)
    for _ in range(2)
  )
  disc_params = discriminator.init_params(
    MODEL.discriminator, jax.random.key(0)
  )

  def transforms(ref, rec, batch_sharding):
    features = codec.stft_features(ref, MODEL.codec, batch_sharding)
    disc = discriminator.MultiScaleSTFTDiscriminator(
      MODEL.discriminator, batch_sharding
    )
    return (
      features,
      signal.per_device(signal.istft, batch_sharding)(features),
      disc.apply({'params': disc_params}, rec),
      losses.reconstruction_losses(MODEL.loss, ref, rec, batch_sharding),
      losses.mel_distance(ref, rec, MODEL.loss.mel, batch_sharding),
    )

  whole = jax.jit(functools.partial(transforms, batch_sharding=None))
  local = jax.jit(functools.partial(transforms, batch_sharding=split))
  expected, got = whole(ref, rec), local(ref, rec)
  assert got[0].sharding.is_equivalent_to(split, 4)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)

"""Every program of a run issues its collectives in one order on all devices.

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
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

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
BATCH, CROP = 8, 4 * 1920


def jitted_programs(model):
  mesh = sharding.make_mesh(MESH)
  abstract = jax.eval_shape(functools.partial(step.init_state, model), 0)
  shardings = sharding.tree_shardings(mesh, abstract, MESH)
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


def check(jitted, abstract, batch, name):
  state = abstract.ema_params if name == 'evaluate' else abstract
  compiled = getattr(jitted, name).lower(state, batch).compile(FAST_COMPILE)
  text = compiled.as_text()
  # The programs do communicate (the RVQ statistics, the gradients, ...).
  assert sharding._COLLECTIVE.search(text), name
  assert sharding.nested_collectives(text) == []
  # Several CPU processes refuse a program that breaks the rule; this one
  # passes (a no-op with one process, as here).
  train.check_collective_order(compiled, name)


@pytest.fixture(scope='module')
def programs():
  return jitted_programs(MODEL)


@pytest.mark.parametrize('name', train.Programs._fields)
def test_no_collective_inside_loops_or_conditionals(programs, name):
  check(*programs, name)


def test_balanced_train_step_keeps_the_rule_too():
  loss = dataclasses.replace(MODEL.loss, balancer=True)
  check(*jitted_programs(dataclasses.replace(MODEL, loss=loss)), 'train_step')

"""A run whose programs cannot fit in a device's memory stops before its
first step, naming the batch that would (training/train.py `check_fits`).
"""

import jax
import jax.numpy as jnp
import pytest

from spectrostream_jax.training import train

WIDTH = 256


def compiled(batch: int):
  """A program whose temporaries grow with the batch (512 KiB an example)."""

  def f(x):
    outer = jnp.einsum('bi,bj->bij', x, x)
    return jnp.cumsum(outer, axis=1).sum(axis=(1, 2))

  shape = jax.ShapeDtypeStruct((batch, WIDTH), jnp.float32)
  return jax.jit(f).lower(shape).compile()


def test_a_program_over_the_limit_is_refused_with_the_batch_that_fits():
  programs = {'small': compiled(1), 'big': compiled(4)}
  limit = 3 * 2**19 + 2**17  # Room for 3 examples' temporaries, not 4.
  memory = (limit, 'H200 memory limit')
  with pytest.raises(train.DoesNotFitError) as e:
    train.check_fits(programs, 4, memory)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith('big needs 2.0 MiB per device')
  assert 'per-device batch of 4' in message
  assert 'about 3 examples per device fit' in message
  # The estimate is right: 3 fit, 4 do not.
  train.check_fits({'big': compiled(3)}, 3, memory)
  # Within the limit: nothing to say.
  train.check_fits(programs, 4, (2**30, 'H200 memory limit'))


def test_on_cpu_the_resident_state_is_not_counted_twice():
  program = compiled(4)
  analysis = program.memory_analysis()
  resident = train.peak_bytes(program, resident=True)
  assert resident == analysis.temp_size_in_bytes + analysis.output_size_in_bytes
  assert (
    train.peak_bytes(program, resident=False)
    == resident + analysis.argument_size_in_bytes
  )


def test_this_machine_reports_its_memory():
  limit, what = train.device_memory()
  assert limit > 2**20
  assert what == 'available host memory'

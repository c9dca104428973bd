"""The training steps: they learn, skip bad updates, and keep their contracts.

On one device. The tiny codec with two small discriminator scales, on a
fixed batch of two 3-frame clips of the synthetic music, with the default
recipe. Steps are compiled with LLVM optimisation off: it halves compile
time and only changes rounding. Each test compiles its own steps, and the
checks that share a run share a test, so pytest-xdist never compiles a
step twice.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectrostream_jax import losses
from spectrostream_jax.data import synthetic
from spectrostream_jax.models import codec
from spectrostream_jax.models import discriminator
from spectrostream_jax.training import optim
from spectrostream_jax.training import state as state_lib
from spectrostream_jax.training import step

FAST_COMPILE = {'xla_backend_optimization_level': 0}
DISC = discriminator.DiscriminatorConfig(
  windows=(64, 128),
  base_channels=4,
  channel_multipliers=(1, 2),
  strides=((1, 2), (1, 2)),
)
ADAM = optim.OptimizerConfig(learning_rate=1e-3)
CONFIG = step.StepConfig(
  codec=codec.tiny(),
  discriminator=DISC,
  generator_optimizer=ADAM,
  discriminator_optimizer=ADAM,
)
OVERFIT_STEPS = 40
# The reconstruction terms fall by at least this factor in OVERFIT_STEPS
# steps (measured: see the test's output).
OVERFIT_FACTOR = 1.5


def test_loss_and_codec_sample_rates_must_agree():
  mel = losses.MelConfig(sample_rate=44_100)
  with pytest.raises(ValueError, match='sample rates differ'):
    step.StepConfig(loss=losses.LossConfig(mel=mel))


def fixed_batch() -> dict[str, np.ndarray]:
  """Two clips of 3 frames plus the look-ahead frame, peak 0.5."""
  clips = [
    synthetic.render(np.random.default_rng(seed), 4 * 1920) for seed in (1, 2)
  ]
  audio = np.stack([c / np.max(np.abs(c)) * 0.5 for c in clips])
  return {'audio': audio.astype(np.float32)}


def compile_step(config: step.StepConfig, state, batch):
  return (
    jax.jit(functools.partial(step.train_step, config), donate_argnums=(0,))
    .lower(state, batch)
    .compile(FAST_COMPILE)
  )


def init_state(config: step.StepConfig, batch):
  """A fresh state with k-means codebooks, as the trainer starts."""
  init = functools.partial(step.init_state, config)
  state = jax.jit(init).lower(0).compile(FAST_COMPILE)(0)
  assert not bool(state.codebooks.initialized)
  codebooks = jax.jit(functools.partial(step.init_codebooks, config))
  state = codebooks.lower(state, batch).compile(FAST_COMPILE)(state, batch)
  assert bool(state.codebooks.initialized)
  return state


def snapshot(tree):
  return jax.tree.map(np.array, tree)


def size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def moments(opt_state) -> int:
  """Elements of the optimizer's per-parameter arrays (not its counters)."""
  return sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)


def check_metrics(metrics):
  levels = CONFIG.codec.quantizer.num_levels
  for name in ('g/mel', 'g/adv', 'g/feat', 'd/loss', 'vq/commit'):
    assert np.isfinite(metrics[name]), name
  assert f'vq/usage/L{levels - 1:02d}' in metrics
  assert f'vq/perplexity/L{levels - 1:02d}' in metrics
  assert metrics['g/lr'] == pytest.approx(1e-3)
  assert all(n.split('/')[0] in ('g', 'd', 'vq', 'train') for n in metrics)


def check_ema_codebooks(before, after):
  """After a step: codebook = EMA sums / counts (up to the smoothing of
  empty codes), no Adam moments, and the parameter EMA holds the live
  codebooks, not an average."""
  assert before.codebooks.initialized and after.codebooks.initialized
  embedding = after.params['quantizer']['embedding']
  counts = after.codebooks.counts
  used = counts > 1e-3
  np.testing.assert_allclose(
    embedding[used],
    (after.codebooks.sums / counts[..., None])[used],
    rtol=1e-3,
    atol=1e-6,
  )
  assert not np.array_equal(embedding, before.params['quantizer']['embedding'])
  assert moments(after.opt_state) == 2 * (size(after.params) - embedding.size)
  np.testing.assert_array_equal(
    after.ema_params['quantizer']['embedding'], embedding
  )


def check_ema_params(initial, first):
  """Step 0 decays by min(0.999, 1 / 10): the EMA moves 90 % of the way."""
  for name in ('encoder', 'decoder'):
    for e, p, e0 in zip(
      jax.tree.leaves(first.ema_params[name]),
      jax.tree.leaves(first.params[name]),
      jax.tree.leaves(initial.ema_params[name]),
      strict=True,
    ):
      np.testing.assert_allclose(e, e0 + 0.9 * (p - e0), rtol=1e-5, atol=1e-7)


def check_skips_non_finite(train_step, state, batch):
  before = snapshot(state)
  bad = {'audio': batch['audio'].copy()}
  bad['audio'][0, 100, 0] = np.nan
  state, metrics = train_step(state, bad)
  after = snapshot(state)
  assert not np.isfinite(metrics['g/total'])
  assert int(after.step) == int(before.step) + 1
  assert int(after.skipped) == int(before.skipped) + 1
  for name in ('params', 'disc_params', 'opt_state', 'ema_params', 'codebooks'):
    for a, b in zip(
      jax.tree.leaves(getattr(after, name)),
      jax.tree.leaves(getattr(before, name)),
      strict=True,
    ):
      np.testing.assert_array_equal(a, b, err_msg=name)
  # Training goes on with the next good batch.
  state, metrics = train_step(state, batch)
  assert np.isfinite(metrics['g/total'])
  assert int(state.skipped) == int(after.skipped)
  old = after.params['decoder']['output_layer']['base_conv_last']['conv']
  new = state.params['decoder']['output_layer']['base_conv_last']['conv']
  assert not np.array_equal(np.asarray(new['kernel']), old['kernel'])


def test_overfits_one_batch_and_keeps_the_step_contracts():
  batch = fixed_batch()
  state = init_state(CONFIG, batch)
  train_step = compile_step(CONFIG, state, batch)
  states, losses_ = [snapshot(state)], []
  for i in range(OVERFIT_STEPS):
    state, metrics = train_step(state, batch)
    losses_.append(float(metrics['g/mel']))
    if i == 0:
      check_metrics(jax.device_get(metrics))
    if i < 2:
      states.append(snapshot(state))

  first, last = losses_[0], np.mean(losses_[-5:])
  print(f'g/mel: first {first:.3f}, mean of the last 5 {last:.3f}')
  assert last * OVERFIT_FACTOR < first, losses_
  assert int(state.skipped) == 0 and int(state.step) == OVERFIT_STEPS
  check_ema_codebooks(states[0], states[1])
  # k-means gave the live and the EMA parameters the same codebooks.
  np.testing.assert_array_equal(
    states[0].ema_params['quantizer']['embedding'],
    states[0].params['quantizer']['embedding'],
  )
  check_ema_params(states[0], states[1])
  check_skips_non_finite(train_step, state, batch)


def test_warmup_then_kmeans_from_its_embeddings():
  """Warm-up steps leave the discriminators alone and fill the buffer;
  k-means then reads it."""
  quantizer = dataclasses.replace(CONFIG.codec.quantizer, kmeans_buffer=20)
  config = dataclasses.replace(
    CONFIG,
    warmup_steps=2,
    codec=dataclasses.replace(CONFIG.codec, quantizer=quantizer),
  )
  batch = fixed_batch()
  init = functools.partial(step.init_state, config)
  state = jax.jit(init).lower(0).compile(FAST_COMPILE)(0)
  warmup = (
    jax.jit(functools.partial(step.train_step, config, warmup=True))
    .lower(state, batch)
    .compile(FAST_COMPILE)
  )
  before = snapshot(state)
  for _ in range(2):
    state, metrics = warmup(state, batch)
  after = snapshot(state)
  assert not any(k.startswith(('d/', 'vq/')) for k in metrics)
  assert {'g/mel', 'g/grad/mel', 'g/grad/total'} <= set(metrics)
  for name in ('disc_params', 'disc_opt_state'):
    for a, b in zip(
      jax.tree.leaves(getattr(after, name)),
      jax.tree.leaves(getattr(before, name)),
      strict=True,
    ):
      np.testing.assert_array_equal(a, b, err_msg=name)
  assert not after.codebooks.initialized
  # 2 steps × 8 rows (2 clips × 4 embeddings): rows 0-7 of the 20-row
  # buffer hold step 0's embeddings, rows 8-15 step 1's; the rest is empty.
  rows = batch['audio'].shape[0] * CONFIG.codec.num_embeddings(
    batch['audio'].shape[1]
  )
  assert rows == 8
  buffer = after.codebooks.buffer
  assert np.all(np.abs(buffer[: 2 * rows]).sum(-1) > 0)
  assert np.all(buffer[2 * rows :] == 0)
  model = codec.SpectroStream(config.codec)
  emb = model.apply(
    {'params': before.params}, batch['audio'], method=model.embed
  )
  np.testing.assert_allclose(
    buffer[:rows], np.asarray(emb).reshape(rows, -1), rtol=1e-5, atol=1e-6
  )

  state = jax.jit(functools.partial(step.init_codebooks, config))(state, batch)
  assert bool(state.codebooks.initialized)
  counts = np.asarray(state.codebooks.counts)
  # Counts are per step of this batch's rows (k-means saw 3 × rows).
  np.testing.assert_allclose(counts.sum(-1), rows, rtol=1e-5)


def test_balancer_gives_each_term_its_weights_share():
  """With the balancer, term t's gradient at x̂ has norm w_t / Σw."""
  loss = dataclasses.replace(
    CONFIG.loss, mel_weight=1.0, phase_weight=3.0, balancer=True
  )
  rng = np.random.default_rng(0)
  cts = {
    'mel': jnp.asarray(rng.standard_normal((2, 50)) * 7.0),
    'phase': jnp.asarray(rng.standard_normal((2, 50)) * 0.01),
  }
  balance = state_lib.BalancerState(
    norms=jnp.zeros(len(losses.TERMS)), weight=jnp.zeros(())
  )
  _, balance = step._balanced(loss, cts, balance)
  # One step of running norms (bias-corrected) is the current norm: the
  # output is the two unit gradients weighted 1/4 and 3/4.
  parts, _ = step._balanced(loss, cts, balance)
  ct = sum(parts.values())
  unit = {k: v / jnp.linalg.norm(v / loss.weights()[k]) for k, v in cts.items()}
  want = 0.25 * unit['mel'] / 1.0 + 0.75 * unit['phase'] / 3.0
  np.testing.assert_allclose(ct, want, rtol=1e-4, atol=1e-7)


def test_balancer_holds_target_shares_while_training_a_toy_problem():
  """Terms whose gradients differ by 10^5 in scale and drift as a toy
  "decoder" trains still reach it in the shares the weights ask for."""
  loss = dataclasses.replace(
    CONFIG.loss,
    mel_weight=2.0,
    phase_weight=2.5,
    wav_weight=2.5,
    feature_weight=2.0,
    adversarial_weight=1.0,
    balancer=True,
    balancer_decay=0.99,
  )
  targets = {n: w / 10.0 for n, w in loss.weights().items()}
  rng = np.random.default_rng(0)
  goals = {n: jnp.asarray(rng.standard_normal(64)) for n in losses.TERMS}
  scales = dict(zip(losses.TERMS, (1e3, 1e-2, 1.0, 30.0, 1e-1), strict=True))
  powers = dict(zip(losses.TERMS, (2, 1, 2, 4, 1), strict=True))

  def cotangents(x):
    def term(x, name):
      return scales[name] * jnp.sum(jnp.abs(x - goals[name]) ** powers[name])

    return {n: loss.weights()[n] * jax.grad(term)(x, n) for n in losses.TERMS}

  @jax.jit
  def toy_step(x, balance):
    cts = cotangents(x)
    parts, balance = step._balanced(loss, cts, balance)
    shares = step._shares(parts)
    raw = step._shares(cts)
    return x - 0.01 * sum(parts.values()), balance, shares, raw

  x = jnp.zeros(64)
  balance = state_lib.BalancerState(
    norms=jnp.zeros(len(losses.TERMS)), weight=jnp.zeros(())
  )
  history = []
  for _ in range(300):
    x, balance, shares, raw = toy_step(x, balance)
    history.append({k.split('/')[-1]: float(v) for k, v in shares.items()})
  # Unbalanced, the same gradients are far from the targets.
  assert (
    max(abs(float(raw[f'g/share/{n}']) - targets[n]) for n in targets) > 0.5
  )
  for shares in history[50:]:
    for name, want in targets.items():
      assert shares[name] == pytest.approx(want, abs=0.02), (name, shares)
  # The terms' gradients drifted by large factors while x moved.
  assert not np.allclose(x, 0.0)


def test_balanced_gradient_norms_report_the_balanced_shares():
  config = dataclasses.replace(
    CONFIG,
    loss=dataclasses.replace(
      CONFIG.loss, balancer=True, mel_weight=1.0, phase_weight=3.0
    ),
  )
  batch = fixed_batch()
  state = init_state(config, batch)
  # Running norms 1, 2, ... 5: term t's balanced part is its weighted
  # gradient over Σw · norm_t.
  running = jnp.arange(1.0, len(losses.TERMS) + 1.0)
  state = state.replace(
    balance=state_lib.BalancerState(norms=running, weight=jnp.ones(()))
  )
  norms = jax.jit(functools.partial(step.gradient_norms, config))(state, batch)
  terms = [n for n, w in config.loss.weights().items() if w]
  scaled = {
    n: float(norms[f'g/grad/{n}']) / float(running[losses.TERMS.index(n)])
    for n in terms
  }
  total = sum(scaled.values())
  for n in terms:
    assert float(norms[f'g/share/{n}']) == pytest.approx(
      scaled[n] / total, rel=1e-4
    )


def test_gradient_norms_and_shares():
  batch = fixed_batch()
  state = init_state(CONFIG, batch)
  norms = jax.jit(functools.partial(step.gradient_norms, CONFIG))(state, batch)
  weights = CONFIG.loss.weights()
  terms = {n for n, w in weights.items() if w}
  assert {k.split('/')[-1] for k in norms if k.startswith('g/share/')} == terms
  shares = [float(v) for k, v in norms.items() if k.startswith('g/share/')]
  assert sum(shares) == pytest.approx(1.0, rel=1e-5)
  assert all(float(v) > 0 for k, v in norms.items() if '/grad/' in k)


def test_bf16_compute_matches_f32():
  """Same parameters and audio: the mel loss agrees to bf16 precision."""
  batch = fixed_batch()['audio']
  params = codec.init_params(CONFIG.codec, jax.random.key(0))

  def mel(config):
    def loss(params, wav):
      model = codec.SpectroStream(config)
      rec = model.apply({'params': params}, wav, 8, method=model.reconstruct)
      return losses.multiscale_mel_loss(
        losses.align_to_reconstruction(wav, rec), rec
      )

    return float(
      jax.jit(loss).lower(params, batch).compile(FAST_COMPILE)(params, batch)
    )

  bf16 = dataclasses.replace(CONFIG.codec, dtype='bfloat16')
  assert mel(bf16) == pytest.approx(mel(CONFIG.codec), rel=0.02)


def test_bf16_step_with_gradient_codebooks():
  """bf16 convolutions keep f32 parameters; codebooks learn by Adam."""
  quantizer = dataclasses.replace(
    CONFIG.codec.quantizer, codebook_learning='gradient'
  )
  config = dataclasses.replace(
    CONFIG,
    codec=dataclasses.replace(
      CONFIG.codec, dtype='bfloat16', quantizer=quantizer
    ),
    discriminator=dataclasses.replace(DISC, dtype='bfloat16'),
    loss=dataclasses.replace(CONFIG.loss, codebook_weight=1.0),
  )
  batch = fixed_batch()
  state = init_state(config, batch)
  train_step = compile_step(config, state, batch)
  embeddings = [np.array(state.params['quantizer']['embedding'])]
  for _ in range(3):
    state, metrics = train_step(state, batch)
    embeddings.append(np.array(state.params['quantizer']['embedding']))
    assert np.isfinite(metrics['g/total']) and np.isfinite(metrics['d/loss'])
  assert int(state.skipped) == 0
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  # k-means set the codebooks, the steps move them by gradient.
  assert bool(state.codebooks.initialized)
  assert not np.array_equal(embeddings[0], embeddings[-1])
  assert moments(state.opt_state) == 2 * size(state.params)

r"""What a recipe's losses see: calibration copies and gradient shares.

    python -m spectrostream_jax.training.diagnostics calibrate \
        --gin_file=experiments/small_debian.gin [--gin_file=recipes/X.gin] \
        [--disc_steps=100] [--out=report.json]
    python -m spectrostream_jax.training.diagnostics memorise \
        --gin_file=experiments/small_debian.gin [--steps=400] [--crops=1]

`calibrate` takes one batch of the experiment's training data, x, and
builds copies x̂ that are wrong in one known way each:

- `random phase`: the codec's STFT (960 / 480) of x with its magnitudes kept
  and its phases drawn at random, resynthesised: right magnitudes, wrong
  phase, which is what a codec that learned only the envelope produces;
- `blurred magnitude`: the true phase with each magnitude averaged with its
  two neighbouring bins: right phase, smeared harmonics;
- `5 ms late`: x delayed by 240 samples; `gain 0.9`: 0.9·x.

For each copy it prints the recipe's loss terms (unweighted), the weighted
sum of the reconstruction terms (what the codec minimises before the
discriminators learn anything), SI-SDR, and the norm of each weighted
term's gradient at x̂ with its share of their sum (`step.term_cotangents`,
the quantity the trainer logs as `g/grad/<term>`). The discriminators are
fresh, or trained for `--disc_steps` steps of Adam to tell x from the
copies. A recipe whose reconstruction loss cannot tell `random phase` from
`blurred magnitude`, or whose phase-sensitive terms hold a tiny share of
the gradient at `random phase`, will not teach a codec its phase
(docs/training.md, "The recipe").

`memorise` trains the recipe (its warm-up, k-means and GAN) on the first
`--crops` crops of the first batch and prints SI-SDR and mel distance of
those crops every 50 steps, continuous and through all RVQ levels: a
recipe that cannot reproduce one crop it sees every step will not learn
music.
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gin
from spectrostream_jax import files
from spectrostream_jax import losses
from spectrostream_jax import signal
from spectrostream_jax.data import pipeline
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import discriminator as disc_lib
from spectrostream_jax.training import step as step_lib
from spectrostream_jax.training import train


def calibration_copies(
  x: np.ndarray, rng: np.random.Generator
) -> dict[str, jax.Array]:
  """The copies of x [B, T, C] described in the module docstring."""
  x = jnp.asarray(x, jnp.float32)
  feat = np.asarray(signal.stft(x))
  b, f, k, c2 = feat.shape
  z = feat.reshape(b, f, k, c2 // 2, 2)
  mag = np.hypot(z[..., 0], z[..., 1])
  phase = np.arctan2(z[..., 1], z[..., 0])

  def synth(m, p):
    spec = np.stack([m * np.cos(p), m * np.sin(p)], -1).reshape(b, f, k, c2)
    out = signal.istft(jnp.asarray(spec, jnp.float32))
    return out[:, : x.shape[1]]

  blurred = (np.roll(mag, 1, axis=2) + mag + np.roll(mag, -1, axis=2)) / 3
  return {
    'random phase': synth(mag, rng.uniform(0, 2 * np.pi, mag.shape)),
    'blurred magnitude': synth(blurred, phase),
    '5 ms late': jnp.roll(x, 240, axis=1),
    'gain 0.9': 0.9 * x,
  }


def _train_discriminators(config, params, x, copies, steps, seed):
  """Adam on the hinge loss: x real, every copy fake."""
  disc = disc_lib.MultiScaleSTFTDiscriminator(config.discriminator)
  fakes = jnp.concatenate(list(copies.values()))
  reals = jnp.concatenate([x] * len(copies))
  tx = optax.adam(1e-4, b1=0.5, b2=0.9)

  @jax.jit
  def update(params, opt_state):
    def loss(params):
      real = disc.apply({'params': params}, reals)
      fake = disc.apply({'params': params}, fakes)
      return losses.discriminator_loss(real, fake)[0]

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = tx.init(params)
  value = None
  for _ in range(steps):
    params, opt_state, value = update(params, opt_state)
  return params, None if value is None else float(value)


def report(
  config: step_lib.StepConfig,
  x: np.ndarray,
  disc_steps: int = 0,
  seed: int = 0,
) -> dict:
  """Loss terms, SI-SDR and gradient shares of each calibration copy."""
  loss = config.loss
  skip = loss.skip_samples
  x = jnp.asarray(x, jnp.float32)
  copies = calibration_copies(np.asarray(x), np.random.default_rng(seed))
  disc = disc_lib.MultiScaleSTFTDiscriminator(config.discriminator)
  params = disc_lib.init_params(config.discriminator, jax.random.key(seed))
  params, d_loss = _train_discriminators(
    config, params, x, copies, disc_steps, seed
  )
  weights = loss.weights()

  @jax.jit
  def measure(x_hat):
    ref, rec = x[:, skip:], x_hat[:, skip:]
    real = disc.apply({'params': params}, ref)
    fake, vjp = jax.vjp(lambda r: disc.apply({'params': params}, r), rec)
    terms = losses.reconstruction_losses(loss, ref, rec)
    terms.update(losses.adversarial_losses(loss, real, fake))
    cts = step_lib.term_cotangents(
      loss, ref, rec, real, fake, lambda ct: vjp(ct)[0]
    )
    norms = {name: jnp.sqrt(jnp.sum(ct**2)) for name, ct in cts.items()}
    recon = sum(
      weights[n] * v for n, v in terms.items() if n in ('mel', 'phase', 'wav')
    )
    return terms, recon, norms, jnp.mean(losses.si_sdr(ref, rec))

  out = {'discriminator_steps': disc_steps, 'discriminator_loss': d_loss}
  for name, x_hat in copies.items():
    terms, recon, norms, sdr = jax.device_get(measure(x_hat))
    total = sum(float(v) for v in norms.values())
    out[name] = {
      'si_sdr': float(sdr),
      'reconstruction_loss': float(recon),
      'terms': {n: float(v) for n, v in terms.items()},
      'grad_norm': {n: float(v) for n, v in norms.items()},
      'grad_share': {n: float(v) / total for n, v in norms.items()},
    }
  out['random phase / blurred magnitude'] = (
    out['random phase']['reconstruction_loss']
    / out['blurred magnitude']['reconstruction_loss']
  )
  return out


def memorise(
  config: step_lib.StepConfig,
  x: np.ndarray,
  steps: int,
  every: int = 50,
  seed: int = 0,
) -> list[dict]:
  """Trains on the fixed batch x with the recipe's schedule; a curve.

  The trainer's programs in the trainer's order (warm-up, k-means, GAN),
  on one device, without the data pipeline. Every `every` steps: SI-SDR
  and mel distance of x through the live parameters, continuous (no RVQ)
  and through the RVQ at its highest bitrate (all levels), after the
  first `skip_samples`.
  """
  x = jnp.asarray(x, jnp.float32)
  batch = {'audio': x}
  codec = codec_lib.SpectroStream(config.codec)
  levels = config.codec.quantizer.num_levels
  skip = config.loss.skip_samples
  state = jax.jit(functools.partial(step_lib.init_state, config))(seed)
  programs = {
    warmup: jax.jit(
      functools.partial(step_lib.train_step, config, warmup=warmup),
      donate_argnums=0,
    )
    for warmup in (True, False)
  }
  init_codebooks = jax.jit(functools.partial(step_lib.init_codebooks, config))

  @jax.jit
  def measure(params):
    variables = {'params': params}
    emb = codec.apply(variables, x, method=codec.embed)
    recs = {
      'continuous': codec.apply(variables, emb, method=codec.decode_embeddings),
      'all_levels': codec.apply(
        variables,
        codec.apply(variables, emb, levels, method=codec.quantize),
        method=codec.decode,
      ),
    }
    out = {}
    for name, rec in recs.items():
      ref, rec = losses.trim(x, rec, skip)
      out[f'si_sdr/{name}'] = jnp.mean(losses.si_sdr(ref, rec))
      out[f'mel_distance/{name}'] = jnp.mean(
        losses.mel_distance(ref, rec, config.loss.mel)
      )
    return out

  curve = []
  start = time.perf_counter()
  for i in range(1, steps + 1):
    warmup = i <= config.warmup_steps
    if not warmup and not bool(state.codebooks.initialized):
      state = init_codebooks(state, batch)
    state, metrics = programs[warmup](state, batch)
    if i % every == 0 or i in (1, steps):
      point = {'step': i, 'seconds': round(time.perf_counter() - start, 1)}
      point.update(
        {k: round(float(v), 3) for k, v in measure(state.params).items()}
      )
      point.update(
        {
          k: round(float(v), 4)
          for k, v in metrics.items()
          if k in ('g/mel', 'g/phase', 'g/wav', 'g/feat', 'd/loss')
        }
      )
      print(json.dumps(point), flush=True)
      curve.append(point)
  return curve


def _write(path: str | None, text: str) -> None:
  if path:
    files.write_atomic(path, text + '\n')


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    description='Calibration copies, gradient shares and memorisation of a '
    'recipe (docs/training.md, "Diagnostics").'
  )
  parser.add_argument('command', choices=('calibrate', 'memorise'))
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument(
    '--disc_steps',
    type=int,
    default=0,
    help='calibrate: Adam steps that train the discriminators on the copies',
  )
  parser.add_argument(
    '--steps', type=int, default=400, help='memorise: training steps'
  )
  parser.add_argument(
    '--crops', type=int, default=1, help='memorise: crops of the first batch'
  )
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', help='also write the result here (JSON)')
  args = parser.parse_args(argv)
  train.parse_gin(args.gin_file, args.gin_bindings)
  model = gin.query_parameter('train.model').scoped_configurable_fn()
  data = gin.query_parameter('train.data').scoped_configurable_fn()
  audio = next(iter(pipeline.make_dataset(data)))['audio']
  if args.command == 'calibrate':
    text = json.dumps(
      report(model, audio, args.disc_steps, args.seed), indent=2
    )
    print(text)
  else:
    curve = memorise(model, audio[: args.crops], args.steps, seed=args.seed)
    text = json.dumps(curve, indent=2)
  _write(args.out, text)


if __name__ == '__main__':
  main()

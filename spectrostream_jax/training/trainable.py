"""Which codec parameters learn: `train.trainable` (docs/finetune.md).

A spec is 'all' or parameter paths joined by '+', each naming a subtree of
the codec's parameters: 'decoder', 'encoder+decoder' (frozen codebooks),
'decoder/decoder_6'. Everything outside the named subtrees is
frozen: it gets no gradient computation, no optimizer state and no
update, and frozen codebooks get no EMA updates or restarts.
"""

from typing import Any

import jax

from spectrostream_jax.training import optim

ALL = 'all'


class SpecError(ValueError):
  """A trainable spec that names no parameters (one line)."""


# The parameters that fix the codes: freeze both and the codes stay.
CODE_PARTS = ('encoder', 'quantizer')


def parse(spec: str) -> tuple[str, ...]:
  """'decoder+quantizer' -> ('decoder', 'quantizer'); 'all' -> ()."""
  if not isinstance(spec, str):
    raise SpecError(f'trainable must be a string, got {spec!r}')
  if spec == ALL:
    return ()
  parts = tuple(spec.split('+'))
  for part in parts:
    names = part.split('/')
    if not all(names) or any(n != n.strip() for n in names):
      raise SpecError(
        f"trainable {spec!r}: write 'all' or parameter paths joined by '+', "
        "such as 'decoder' or 'encoder+decoder'"
      )
  return parts


def learns(path: str, parts: tuple[str, ...]) -> bool:
  """Does the parameter at '/'-joined `path` learn under `parts`?"""
  return not parts or any(path == p or path.startswith(p + '/') for p in parts)


def mask(params: Any, parts: tuple[str, ...]) -> Any:
  """A tree of bools like `params`: True where the parameter learns."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: learns(optim.path_str(path), parts), params
  )


def check(params: Any, spec: str) -> None:
  """Refuses a spec with a path that names no parameter, listing the tops."""
  paths = [
    optim.path_str(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  for part in parse(spec):
    if not any(learns(path, (part,)) for path in paths):
      tops = sorted({p.split('/')[0] for p in paths})
      raise SpecError(
        f'trainable {spec!r}: {part!r} names no codec parameter '
        f'(the top-level ones are {", ".join(tops)})'
      )


def stop_frozen(params: Any, parts: tuple[str, ...]) -> Any:
  """params with frozen leaves behind stop_gradient (no backward for them)."""
  if not parts:
    return params
  return jax.tree.map(
    lambda learn, p: p if learn else jax.lax.stop_gradient(p),
    mask(params, parts),
    params,
  )


def keep_frozen(new: Any, old: Any, parts: tuple[str, ...]) -> Any:
  """`new`, with the frozen leaves taken from `old` (bit for bit)."""
  if not parts:
    return new
  return jax.tree.map(
    lambda learn, n, o: n if learn else o, mask(old, parts), new, old
  )


def freezes_codes(spec: str) -> bool:
  """True when neither the encoder nor the codebooks learn."""
  parts = parse(spec)
  return bool(parts) and all(p.split('/')[0] not in CODE_PARTS for p in parts)

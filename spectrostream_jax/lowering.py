"""Checks that a program lowers for TPU and GPU as it should, without them.

A program traced on a CPU-only machine can be lowered to StableHLO for
another platform (`Traced.lower(lowering_platforms=...)`), with abstract
meshes of any shape standing in for a pod. The module it yields is what
XLA would compile there, so three faults that only show on the hardware
can be found on a laptop:

- a host callback (`jax.debug.callback`, `jax.debug.print`,
  `pure_callback`, `io_callback`) or another host transfer, which stalls
  every step on the host (and on several hosts, one process per callback);
- a float64 value, which TPUs emulate slowly and GPUs run at a fraction
  of float32 speed;
- a custom call that the platform has no kernel for (a CPU-only LAPACK or
  FFT call, say), which fails to compile there.

`checked_stablehlo` lowers a traced program and raises `LoweringError`
listing each of them; `jaxpr_problems` and `module_problems` are its two
halves (the jaxpr is checked first: a host callback cannot even be lowered
for TPU or GPU on a CPU-only machine). `main_signature` reads the sharding
and donation of the module's arguments and results, and
`sharding_mismatches` compares them with the shardings a caller intended
(`training/sharding.py`'s for a train state). The shardings are read from
Shardy's `sdy.sharding` attributes, the partitioner this JAX uses.

`precision_problems` reads another property of a module: the
convolutions and dots that let the platform multiply float32 at reduced
precision (TF32, bf16 passes), which the inference programs must not do
(docs/precision.md).

What this does not prove: the module is neither compiled nor run, so XLA's
own limits on the platform (memory, unsupported layouts, kernel bugs) and
the numbers it computes stay untested.
"""

from collections.abc import Iterator, Mapping
import dataclasses
import re
from typing import Any

import jax
import jax.extend.core
import numpy as np

# Custom-call targets a program may hold on each platform: those JAX
# emits for partitioning without Shardy (with Shardy, the programs here
# hold none). Anything else is reported.
PORTABLE_CUSTOM_CALLS = frozenset(
  {'Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape'}
)
ALLOWED_CUSTOM_CALLS = {
  'tpu': PORTABLE_CUSTOM_CALLS,
  'cuda': PORTABLE_CUSTOM_CALLS,
}
# Targets with a kernel on CPU only (LAPACK, DUCC FFT, XLA:CPU's own).
_CPU_ONLY_TARGET = re.compile(r'^(lapack_|ducc_|cpu_|xla_cpu_)')
_CALLBACK_TARGET = re.compile(r'callback', re.IGNORECASE)

# Primitives that call back into Python on the host, and the effects of
# those that have one (jax.debug.* and io_callback; pure_callback has none).
HOST_CALLBACK_PRIMITIVES = frozenset(
  {'debug_callback', 'debug_print', 'pure_callback', 'io_callback'}
)
HOST_EFFECTS = frozenset(
  {'DebugEffect', 'OrderedDebugEffect', 'IOEffect', 'OrderedIOEffect'}
)
FLOAT64_DTYPES = frozenset({np.dtype('float64'), np.dtype('complex128')})

# Ops that move data between the device and its host.
_HOST_TRANSFER_OP = re.compile(
  r'\b(?:stablehlo|mhlo)\.(send|recv|infeed|outfeed)\b'
)
_OP = re.compile(r'\b((?:stablehlo|mhlo|chlo|sdy|func)\.[a-z_]+)')
_CUSTOM_CALL = re.compile(
  r'custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*"([^"]*)"'
)
_SIDE_EFFECT = re.compile(r'has_side_effect\s*=\s*true')
_FLOAT64_TYPE = re.compile(r'tensor<(?:[^<>]*x)?(?:complex<)?f64>')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_LOCATION = re.compile(r'loc\((?:"(?:[^"\\]|\\.)*"|[^()"]|\([^()]*\))*\)')
_PRODUCT_OP = re.compile(r'\bstablehlo\.(?:convolution|dot_general|dot)\b')
# `precision_config = [#stablehlo<precision HIGHEST>, ...]` on a
# convolution, `precision = [HIGHEST, HIGHEST]` on a dot; none is DEFAULT.
_PRECISIONS = re.compile(r'\bprecision(?:_config)?\s*=\s*\[([^\]]*)\]')
_PRECISION = re.compile(r'\b(DEFAULT|HIGHEST|HIGH)\b')

# Files whose frames are JAX's and its libraries', not the program's.
_LIBRARY_FRAME = re.compile(r'/(jax|jaxlib|flax|optax)/')


class LoweringError(Exception):
  """A program does not lower cleanly for a platform."""

  def __init__(self, platform: str, problems: list[str]):
    self.platform = platform
    self.problems = problems
    shown = '\n  '.join(problems[:20])
    more = (
      f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    )
    super().__init__(
      f'{len(problems)} problem(s) lowering for {platform}:\n  {shown}{more}'
    )


# Checks ----------------------------------------------------------------------


def stablehlo(traced: jax.stages.Traced, platform: str) -> str:
  """The StableHLO text of `traced` lowered for `platform` (no checks).

  With debug information: the main function's arguments carry their
  Python names (`state.params['encoder']...`).
  """
  lowered = traced.lower(lowering_platforms=(platform,))
  return lowered.as_text(debug_info=True)


def checked_stablehlo(traced: jax.stages.Traced, platform: str) -> str:
  """`stablehlo(traced, platform)`; LoweringError if anything is amiss."""
  problems = jaxpr_problems(traced.jaxpr)
  if problems:
    # A host callback does not even lower for a platform this machine
    # lacks: the jaxpr says what and where.
    raise LoweringError(platform, problems)
  text = stablehlo(traced, platform)
  problems = module_problems(text, platform)
  if problems:
    raise LoweringError(platform, problems)
  return text


def jaxpr_problems(jaxpr: Any) -> list[str]:
  """Host callbacks and float64 values of a (closed) jaxpr and its callees.

  Each problem once, with the first line of the program that made it.
  """
  found = {}

  def note(problem, eqn):
    if not found.get(problem):
      found[problem] = _where(eqn)

  for eqn, calls in _equations(jaxpr):
    name = eqn.primitive.name
    # Effects and dtypes reach every enclosing call; name the callee's op.
    if calls:
      continue
    effects = {type(e).__name__ for e in eqn.effects}
    if name in HOST_CALLBACK_PRIMITIVES or effects & HOST_EFFECTS:
      note(f'host callback: {name}', eqn)
    for var in (*eqn.invars, *eqn.outvars):
      dtype = getattr(getattr(var, 'aval', None), 'dtype', None)
      if dtype in FLOAT64_DTYPES:
        note(f'{dtype} value: {name}', eqn)
  return [f'{what}{where}' for what, where in found.items()]


def module_problems(text: str, platform: str) -> list[str]:
  """Host transfers, float64 types and foreign custom calls of a module.

  `text` is StableHLO as `Lowered.as_text()` or `Exported.mlir_module()`
  print it; `platform` chooses the custom-call allow-list. Each problem
  once, with the number of the first line that has it.
  """
  allowed = ALLOWED_CUSTOM_CALLS.get(platform, PORTABLE_CUSTOM_CALLS)
  found = {}
  for number, line in enumerate(text.splitlines(), 1):
    if line.startswith('#loc'):
      continue
    for problem in _line_problems(line, allowed, platform):
      found.setdefault(problem, number)
  return [f'{problem} (line {number})' for problem, number in found.items()]


def precision_problems(text: str) -> list[str]:
  """Convolutions and dots of a module not at full float32 precision.

  An op is at full precision when both operands ask for HIGHEST; without
  a precision attribute it asks for DEFAULT. One entry per op, with its
  line number and what it asks for.
  """
  found = []
  for number, line in enumerate(text.splitlines(), 1):
    if line.startswith('#loc'):
      continue
    code = _STRING.sub('""', _LOCATION.sub('', line))
    op = _PRODUCT_OP.search(code)
    if not op:
      continue
    match = _PRECISIONS.search(code)
    asked = _PRECISION.findall(match.group(1)) if match else []
    if not asked or any(p != 'HIGHEST' for p in asked):
      found.append(
        f'{op.group(0)} at {", ".join(asked) or "DEFAULT"} (line {number})'
      )
  return found


def _line_problems(line: str, allowed, platform: str) -> Iterator[str]:
  line = _LOCATION.sub('', line)
  code = _STRING.sub('""', line)
  for match in _CUSTOM_CALL.finditer(line):
    target = match.group(1) or match.group(2)
    if _CALLBACK_TARGET.search(target):
      yield f'host callback: custom_call @{target}'
    elif _SIDE_EFFECT.search(line):
      yield f'side-effecting custom_call @{target} (a host transfer?)'
    elif target not in allowed:
      where = 'CPU-only' if _CPU_ONLY_TARGET.match(target) else 'unknown'
      yield f'custom_call @{target}: {where}, not allowed on {platform}'
  transfer = _HOST_TRANSFER_OP.search(line)
  if transfer:
    yield f'host transfer: {transfer.group(0)}'
  if _FLOAT64_TYPE.search(code):
    op = _OP.search(line)
    yield f'float64 type: {op.group(1) if op else code.strip()[:60]}'


def _equations(jaxpr) -> Iterator[tuple[Any, bool]]:
  """(equation, whether it holds sub-jaxprs) of a jaxpr and its callees."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for eqn in jaxpr.eqns:
    subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
    yield eqn, bool(subs)
    for sub in subs:
      yield from _equations(sub)


def _where(eqn) -> str:
  """' at FILE:LINE (FUNCTION)' of the program line behind `eqn`, or ''."""
  try:
    frames = eqn.source_info.traceback.frames
  except AttributeError:
    return ''
  for frame in frames:
    if not _LIBRARY_FRAME.search(frame.file_name):
      return f' at {frame.file_name}:{frame.line_num} ({frame.function_name})'
  return ''


# Signature: shardings and donation -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Value:
  """An argument or result of a module's main function."""

  name: str  # Python path of an argument, jax.result_info of a result
  type: str  # e.g. 'tensor<3x3x64x64xf32>'
  # Mesh axes each dimension is split over (() for none); None when the
  # value has no Shardy sharding.
  axes: tuple[tuple[str, ...], ...] | None
  donated: bool  # an argument whose buffer the outputs may reuse


def main_signature(text: str) -> tuple[dict[str, Value], dict[str, Value]]:
  """({argument name: Value}, {result name: Value}) of the main function.

  Argument names are the Python paths JAX records in the arguments'
  locations (`state.params['encoder']...`; lower with debug information),
  result names those of `jax.result_info` (`result[0].params[...]`).
  Unused arguments that JAX pruned are absent.
  """
  start = text.find('func.func public @main(')
  if start < 0:
    raise ValueError('no public main function in the module')
  pos = start + len('func.func public @main(')
  args, pos = _split_list(text, pos)
  results = []
  rest = text[pos : pos + 8].lstrip()
  if rest.startswith('->'):
    arrow = text.index('->', pos) + 2
    while text[arrow] == ' ':
      arrow += 1
    if text[arrow] == '(':
      results, _ = _split_list(text, arrow + 1)
  return (
    _values(args, _argument_name),
    _values(results, _result_name),
  )


def spec_axes(spec, rank: int) -> tuple[tuple[str, ...], ...]:
  """A PartitionSpec as the mesh axes of each of `rank` dimensions."""
  out = []
  for entry in tuple(spec) + (None,) * (rank - len(spec)):
    if entry is None:
      out.append(())
    elif isinstance(entry, str):
      out.append((entry,))
    else:
      out.append(tuple(entry))
  return tuple(out)


def named_shardings(prefix: str, tree) -> dict[str, Any]:
  """{module name: sharding} of a pytree of shardings passed as `prefix`.

  The names are those JAX gives the arguments: for the train state passed
  as `state`, 'state.params['encoder']...'; for results 'result[0]...'.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(path): s for path, s in leaves}


def sharding_mismatches(
  values: Mapping[str, Value], intended: Mapping[str, Any]
) -> list[str]:
  """Where the module's shardings differ from `intended` {name: sharding}.

  `intended` holds NamedShardings (or PartitionSpecs); a name that is not
  a value of the module is a mismatch too.
  """
  out = []
  for name, sharding in intended.items():
    value = values.get(name)
    if value is None:
      out.append(f'{name}: not in the module')
      continue
    if value.axes is None:
      out.append(f'{name}: no sdy.sharding in the module')
      continue
    spec = getattr(sharding, 'spec', sharding)
    want = spec_axes(spec, len(value.axes))
    if value.axes != want:
      out.append(f'{name}: module {_show(value.axes)}, intended {_show(want)}')
  return out


def _show(axes: tuple[tuple[str, ...], ...]) -> str:
  return '[' + ', '.join('{' + ','.join(a) + '}' for a in axes) + ']'


def _split_list(text: str, pos: int) -> tuple[list[str], int]:
  """The top-level comma-separated items from `pos` to the closing paren.

  Brackets of every kind nest; quoted strings are skipped; the '>' of
  '->' closes nothing. Returns (items, position after the paren).
  """
  items, depth, begin, i = [], 0, pos, pos
  while True:
    c = text[i]
    if c == '"':
      i += 1
      while text[i] != '"':
        i += 2 if text[i] == '\\' else 1
    elif c in '([{<':
      depth += 1
    elif c in ')]}' or (c == '>' and text[i - 1] != '-'):
      if depth == 0:
        if text[begin:i].strip():
          items.append(text[begin:i].strip())
        return items, i + 1
      depth -= 1
    elif c == ',' and depth == 0:
      items.append(text[begin:i].strip())
      begin = i + 1
    i += 1


_LOC_NAME = re.compile(r'loc\("((?:[^"\\]|\\.)*)"\)\s*$')
_RESULT_INFO = re.compile(r'jax\.result_info\s*=\s*"((?:[^"\\]|\\.)*)"')
_SDY = re.compile(r'sdy\.sharding\s*=\s*#sdy\.sharding<@?[\w"]+\s*,\s*\[')
_ALIASED = re.compile(r'tf\.aliasing_output\s*=|jax\.buffer_donor\s*=\s*true')


def _unescape(s: str) -> str:
  return re.sub(r'\\(.)', r'\1', s)


def _argument_name(item: str) -> str | None:
  match = _LOC_NAME.search(item)
  return _unescape(match.group(1)) if match else None


def _result_name(item: str) -> str | None:
  match = _RESULT_INFO.search(item)
  return _unescape(match.group(1)) if match else None


def _values(items: list[str], name_of) -> dict[str, Value]:
  out = {}
  for i, item in enumerate(items):
    name = name_of(item) or f'#{i}'
    body = re.sub(r'^%[\w#]+\s*:\s*', '', item)
    out[name] = Value(
      name=name,
      type=body.split(' ', 1)[0],
      axes=_axes(item),
      donated=bool(_ALIASED.search(item)),
    )
  return out


def _axes(item: str) -> tuple[tuple[str, ...], ...] | None:
  match = _SDY.search(item)
  if not match:
    return None
  dims, _ = _split_list(item, match.end())
  return tuple(tuple(re.findall(r'"([^"]+)"', d)) for d in dims)

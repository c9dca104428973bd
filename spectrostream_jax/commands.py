"""What every command line of the package shares: --version and Ctrl-C.

Ctrl-C must end a command at once, whatever it is doing (importing JAX,
compiling, waiting on XLA), with one line, exit status 130 and no temp
file left behind. A KeyboardInterrupt cannot promise that: Python only
raises it between bytecodes of the main thread, so it waits for a compile
to finish, can be swallowed by a callback, and unwinding it while XLA's
threads still run has crashed the interpreter at exit. Instead SIGINT is
blocked in every thread (threads inherit the mask, so this must run
before JAX is imported) and one thread waits for it, removes the
unfinished temp files and ends the process.
"""

import argparse
import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import threading

import spectrostream_jax
from spectrostream_jax import files

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C.


def version(prog: str) -> str:
  return f'{prog} (spectrostream_jax {spectrostream_jax.__version__})'


def add_version(parser: argparse.ArgumentParser, prog: str) -> None:
  parser.add_argument('--version', action='version', version=version(prog))


def _interrupted(prog: str) -> None:
  # Spawned workers inherit the blocked SIGINT, so they are ended here.
  for child in multiprocessing.active_children():
    child.kill()
  files.remove_pending()
  with contextlib.suppress(OSError, ValueError):
    sys.stdout.flush()
  os.write(2, f'{prog}: interrupted\n'.encode())
  os._exit(INTERRUPTED)


def exit_on_interrupt(prog: str) -> None:
  """From now on SIGINT removes pending temp files and exits 130 at once.

  Call first thing in a console entry point, before JAX is imported; not
  from library code or tests, which keep Python's KeyboardInterrupt.
  """
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

  def wait() -> None:
    signal.sigwait({signal.SIGINT})
    _interrupted(prog)

  threading.Thread(target=wait, name='sigint', daemon=True).start()


def _entry(prog: str, module: str) -> None:
  """Sets up Ctrl-C, then imports `module` (and JAX) and runs its main."""
  exit_on_interrupt(prog)
  sys.exit(importlib.import_module(module).main())


# Console entry points (pyproject.toml [project.scripts]).
def spectrostream() -> None:
  _entry('spectrostream', 'spectrostream_jax.cli')


def spectrostream_data() -> None:
  _entry('spectrostream-data', 'spectrostream_jax.data.cli')


def spectrostream_export() -> None:
  _entry('spectrostream-export', 'spectrostream_jax.export')


def spectrostream_eval() -> None:
  _entry('spectrostream-eval', 'spectrostream_jax.evaluation.ladder')

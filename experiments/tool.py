"""The command-line layer every ``python -m experiments.TOOL`` runs through.

A tool's main block is one call: ``tool.run(main)`` (flags defined in
``flags.FLAGS``) or ``tool.run(main, FLAGS)`` (in the tool's own FlagValues).

absl flags and `absl.app.run`, with one rule for what a user can fix: an
unknown flag, a bad flag value, a missing required flag or positional
argument (`positional`), a missing file and the runner's errors
(`slora_jax.runner.errors.USER_ERRORS`, plus the tool's own ``user_errors``)
end the tool with one line ``error: ...`` on stderr and exit code 2. Any
other exception is a bug and keeps its traceback. Library logs (JAX, Orbax,
absl, TF) stay at WARNING unless ``--verbosity=1``, so that one line is all
a user's error prints.

A tool whose flag names another tool also defines (``--out``, ``--seed``)
keeps them in its own ``flags.FlagValues``, so that tests can import every
tool into one process; `call` runs such a tool in-process.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging

Main = Callable[[list[str]], "int | None"]


def fail(message) -> NoReturn:
  """One line ``error: MESSAGE`` on stderr (whitespace folded), exit 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr,
        flush=True)
  sys.exit(2)


def positional(argv: Sequence[str], *names: str) -> list[str]:
  """``argv[1:]`` if it holds exactly the arguments ``names`` (as the usage
  line spells them, e.g. ``"WORKDIR"``); else `app.UsageError`."""
  args = list(argv[1:])
  if len(args) > len(names):
    raise app.UsageError("unexpected arguments: "
                         + " ".join(args[len(names):]))
  if len(args) < len(names):
    raise app.UsageError(f"give {' '.join(names[len(args):])} (see --help)")
  return args


def quiet_libraries(verbosity: int) -> None:
  """Library logs at WARNING unless ``verbosity`` >= 1 (``--verbosity``)."""
  level = std_logging.INFO if verbosity >= 1 else std_logging.WARNING
  std_logging.getLogger().setLevel(level)
  logging.set_verbosity(logging.INFO if verbosity >= 1 else logging.WARNING)
  if verbosity < 1:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _user_errors() -> tuple[type[BaseException], ...]:
  try:
    from slora_jax.runner import errors  # pylint: disable=import-outside-toplevel
  except ImportError:       # a tool installed without the runner's extras
    return (FileNotFoundError,)
  return errors.USER_ERRORS


def guard(main: Main, user_errors: tuple[type[BaseException], ...] = ()
          ) -> Main:
  """``main`` with usage and user errors turned into `fail`."""
  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(e)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, _user_errors() + tuple(user_errors)):
        fail(e)
      raise
  return guarded


def parse_flags(argv: list[str],
                flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's parsing; an unknown flag or a bad or missing value is `fail`."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    missing = re.search(r"Flag (--\w+) must have a value other than None",
                        str(e))        # absl's text for a required flag
    fail(f"give {missing[1]} (a required flag); see --help" if missing
         else f"{str(e).rstrip('.')}; see --helpfull")


def _adopt(own: flags.FlagValues) -> None:
  """``own``'s flags parsed with absl's (``--help``, ``--verbosity``) and
  listed by ``--help`` as the main module's."""
  flags.FLAGS.append_flag_values(own)
  for module_flags in own.flags_by_module_dict().values():
    for flag in module_flags:
      flags.FLAGS.register_flag_by_module(sys.argv[0], flag)


def run(main: Main, flag_values: flags.FlagValues | None = None,
        user_errors: tuple[type[BaseException], ...] = (),
        flags_parser: Callable[[list[str]], list[str]] = parse_flags
        ) -> NoReturn:
  """`absl.app.run` of ``main`` under the layer's rule (module docstring).

  ``flag_values``: the tool's own flags, if not in ``flags.FLAGS``.
  ``user_errors``: the tool's exception types that are the user's to fix.
  ``flags_parser``: replaces `parse_flags` (which it should call).
  """
  def parse(argv):
    rest = flags_parser(argv)
    if flag_values is not None:
      flag_values.mark_as_parsed()
    return rest

  def quiet_main(argv):
    quiet_libraries(flags.FLAGS.verbosity)
    return main(argv)

  if flag_values is not None:
    _adopt(flag_values)
  app.run(guard(quiet_main, user_errors), flags_parser=parse)


def call(main: Main, args: Sequence[str], flag_values: flags.FlagValues,
         user_errors: tuple[type[BaseException], ...] = ()) -> int:
  """In-process ``python -m`` of a tool with its own ``flag_values`` (tests):
  the exit code; the flags are reset afterwards."""
  try:
    argv = parse_flags(["tool", *args], flag_values)
    return guard(main, user_errors)(argv) or 0
  except SystemExit as e:
    return 0 if e.code is None else e.code
  finally:
    flag_values.unparse_flags()

"""How every md_jax program (`md_jax.main`, `md_jax.generate`, `md_jax.export`) ends on an error a
user can cause: status 1 and one last stderr line, `FATAL <message naming the culprit>`.

    cli_errors.run(main, log_dir=lambda: FLAGS.workdir)   # instead of absl's app.run(main)

The traceback goes to `<log_dir>/error.log` (appended, with the time and the command line), or to
stderr, above the FATAL line, under `--verbose`. Any other exception is a bug and keeps Python's
traceback.

What counts as the user's (`is_user_error`):
  * ValueError: every config, flag and checkpoint check raises one (`CheckpointError` too);
  * OSError: a missing, unreadable or unwritable path, a full disk (FileNotFoundError,
    NotADirectoryError, PermissionError, ...); the message names the file;
  * FloatingPointError: the trainer's NaN guard, a run that diverged (learning rate, data);
  * a KeyError or AttributeError raised by an ml_collections ConfigDict lookup: the config lacks
    a key the code reads (a hand-written config, a misspelt key). A KeyError from any other
    mapping is our bug, not the user's, and keeps its traceback.
"""

import datetime
import difflib
import os
import pathlib
import re
import sys
import traceback

from absl import app, flags

LOG_NAME = "error.log"


def define_verbose_flag() -> None:
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool(
      "verbose", False, "On an error, print its traceback here instead of into error.log."
    )


def is_user_error(error: BaseException) -> bool:
  if isinstance(error, (KeyError, AttributeError)):
    return _from_config_lookup(error)
  return isinstance(error, (ValueError, OSError, FloatingPointError))


def _from_config_lookup(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and f"{os.sep}ml_collections{os.sep}" in frames[-1].filename


def one_line(error: BaseException) -> str:
  """The error's message on one line; a ConfigDict lookup's as 'config has no key ...'."""
  if isinstance(error, (KeyError, AttributeError)):
    key, suggestion = _missing_key(error)
    if key is not None:
      return f"the config has no key {key!r}" + (
        f" (did you mean {suggestion!r}?)" if suggestion else ""
      )
  text = " ".join(str(error).split())
  return text or type(error).__name__


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _missing_key(error: BaseException) -> tuple[str | None, str | None]:
  """(key, suggested key) of a ConfigDict's KeyError, whose message is garbled on the way out
  (`'\\'optimzer\\'\\nDid you mean "optimizer" ...'`): the innermost KeyError holds the bare key."""
  keys = [e for e in _chain(error) if isinstance(e, KeyError) and e.args]
  if not keys or not isinstance(keys[-1].args[0], str):
    return None, None
  found = re.search(r'Did you mean "([^"]+)"', " ".join(str(e.args[0]) for e in keys))
  return keys[-1].args[0], found.group(1) if found else None


def _verbose(argv=None) -> bool:
  if "verbose" in flags.FLAGS and flags.FLAGS.is_parsed():
    return bool(flags.FLAGS.verbose)
  return "--verbose" in (argv or sys.argv)


def fatal(message: str, *, detail: str | None = None, log_dir=None):
  """Ends the program: `detail` (a traceback) to `<log_dir>/error.log` or, under `--verbose`, to
  stderr; then `FATAL <message>` as the last stderr line; exit status 1."""
  if detail:
    if _verbose():
      sys.stderr.write(detail)
    else:
      path = _append_log(log_dir, detail)
      sys.stderr.write(f"(details in {path})\n" if path else "(--verbose prints the details)\n")
  sys.stderr.write(f"FATAL {' '.join(message.split())}\n")
  sys.stderr.flush()
  raise SystemExit(1)


def _append_log(log_dir, detail: str) -> pathlib.Path | None:
  """Appends `detail` to error.log in the first of `log_dir` (a path or a list of them) that is
  an existing local directory and takes the file; None where none does (nothing is created for
  it). A `gs://` (any `scheme://`) one is passed over: `os.path` would read it as the local
  `gs:/...`, and an error handler should not wait on a bucket."""
  candidates = log_dir if isinstance(log_dir, (list, tuple)) else [log_dir]
  index = _process_index()
  name = LOG_NAME if not index else f"error.process{index}.log"  # one file per process
  stamp = datetime.datetime.now().isoformat(timespec="seconds")
  for directory in candidates:
    if not directory or "://" in str(directory) or not os.path.isdir(directory):
      continue
    path = pathlib.Path(directory) / name
    try:
      with open(path, "a") as f:
        f.write(f"=== {stamp} {' '.join(sys.argv)}\n{detail}\n")
      return path
    except OSError:
      continue
  return None


def _process_index() -> int:
  jax = sys.modules.get("jax")
  try:
    return jax.process_index() if jax is not None else 0
  except Exception:  # no backend: a single process as far as the log is concerned
    return 0


def run(main, *, log_dir=lambda: None, flags_parser=None) -> None:
  """`absl.app.run(main)`, ending on a user error (`is_user_error`) or an `app.UsageError` with
  one FATAL line. `log_dir()` is asked, when it happens, where error.log goes: a directory or a
  list of them, the first existing one that takes the file (none: only `--verbose` shows it)."""

  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fatal(f"{e} (--helpshort lists the flags)")
    except Exception as e:
      if not is_user_error(e):
        raise
      try:
        directory = log_dir()
      except Exception:  # the flags that name it are what failed
        directory = None
      fatal(one_line(e), detail=traceback.format_exc(), log_dir=directory)

  app.run(guarded, flags_parser=flags_parser or parse_flags)


def parse_flags(argv, config_flag: str | None = None):
  """absl's flag parsing, every failure one FATAL line naming the flag. `config_flag`: an
  ml_collections `DEFINE_config_file` flag, whose file's failure to load is reported by name."""
  try:
    remaining = flags.FLAGS(argv)
  except Exception as e:
    loaded = _config_load_error(config_flag, argv, e)
    if loaded:
      fatal(loaded)
    if isinstance(e, (flags.Error, KeyError, AttributeError, ValueError)):
      fatal(_flag_error(e, argv))
    raise
  loaded = _config_load_error(config_flag, argv)
  if loaded:
    fatal(loaded)
  return remaining


def _config_load_error(config_flag, argv, error=None) -> str | None:
  """ml_collections keeps a config file that failed to load (missing, or raising an OSError) as
  a value that raises an OSError on first use (an override flag's parse is one): said here, with
  the file, before anything else uses it."""
  if not config_flag or config_flag not in flags.FLAGS:
    return None
  if error is None:
    value = flags.FLAGS[config_flag].value
    if value is None:
      return None
    try:
      value.get("stage")
      return None
    except OSError as e:
      error = e
  elif not isinstance(error, OSError):
    return None
  path = _flag_value(argv, config_flag)
  file = path.split(":", 1)[0]
  if not os.path.exists(file):
    return f"--{config_flag}={path}: no such config file ({os.path.abspath(file)})"
  return f"--{config_flag}={path}: {one_line(list(_chain(error))[-1])}"


def _flag_value(argv, name: str) -> str:
  """What `--name=value` or `--name value` gave in `argv` (the last one)."""
  found = ""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      found = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      found = argv[i + 1]
  return found


def _flag_error(error: BaseException, argv) -> str:
  if isinstance(error, (KeyError, AttributeError)):  # an override of a key the config lacks
    key, suggestion = _missing_key(error)
    if key is not None:
      culprit = next((a for a in argv[1:] if key in _override_path(a)), None)
      hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
      return f"unknown config key {key!r}" + (f" in {culprit}" if culprit else "") + hint
  if isinstance(error, flags.UnrecognizedFlagError) and "Did you mean" not in str(error):
    close = difflib.get_close_matches(getattr(error, "flagname", "") or "", list(flags.FLAGS), n=1)
    return one_line(error) + (f" (did you mean --{close[0]}?)" if close else "")
  # ml_collections wraps a config file's own error in its traceback, as text: the innermost
  # exception of the chain is the config file's message.
  innermost = list(_chain(error))[-1]
  marker = ": Error whilst parsing config file"
  if innermost is not error and marker in str(error):
    flag = str(error).split(marker, 1)[0].removeprefix("flag ")
    return f"{flag}: {one_line(innermost)}"
  return one_line(error)


def _override_path(arg: str) -> list[str]:
  """`--config.a.b=v` → ["config", "a", "b"]; anything else → []."""
  if not arg.startswith("--") or "." not in arg.split("=")[0]:
    return []
  return arg[2:].split("=", 1)[0].split(".")

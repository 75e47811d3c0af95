"""What every recipe does around its work, so a user sees the same behaviour from each:

* ``check_overrides(Schema)`` before Hydra starts: a command-line key that is not in the recipe's config dataclass is
  refused, also with ``+`` (Hydra would add it and the run would start without it), naming the nearest valid key;
* ``recipe_run(run_dir, "pretrain")`` around the work: everything the recipe prints also goes to its log file
  ``RUN_DIR/pretrain.log`` (Hydra's file logger already writes log records there); a ``ConfigError`` or
  ``DataError`` prints one line (key, value, fix) instead of a traceback, exits with ``EXIT_CONFIG`` and removes the
  run dir when it holds nothing but what Hydra made for this attempt.

Both print to stderr as ``error: MESSAGE``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import sys
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tml.data.loader import DataError
from tml.errors import ConfigError

EXIT_CONFIG = 2  # a usage error, like argparse's
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_OVERRIDE = re.compile(r"^(\+\+|\+|~)?([A-Za-z_][\w.]*)(=|$)")  # [+|++|~]key=value, or ~key


def _field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp: object) -> object:
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def valid_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass (sections and leaves)."""
    keys = []
    for name, tp in _field_types(schema).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(_unwrap(tp)):
            keys += valid_keys(_unwrap(tp), f"{prefix}{name}.")
    return keys


def unknown_key_message(key: str, override: str, schema: type, groups: tuple[str, ...] = ()) -> str | None:
    """None if ``key`` (dotted) names a field of ``schema`` (or a config group, or lies inside a dict-typed field);
    else the error text with the nearest valid key."""
    node: object = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return None  # inside a dict / list / Any field: free-form
        fields = _field_types(node)
        if part in fields:
            node = _unwrap(fields[part])
            continue
        if i == 0 and part in groups:
            return None
        section = ".".join(parts[:i])
        names = list(fields) + (list(groups) if i == 0 else [])
        # Nearest: a close name in the same section, with the rest of the key when that makes a valid key.
        near = []
        for name in difflib.get_close_matches(part, names, n=1, cutoff=0.6):
            fixed = ".".join(parts[:i] + [name] + parts[i + 1:])
            ok = unknown_key_message(fixed, override, schema, groups) is None
            near = [fixed if ok else ".".join(parts[:i] + [name])]
        hint = f"did you mean {near[0]}?" if near else \
            f"the keys{' of ' + section if section else ''} are: {', '.join(sorted(set(names)))}"
        return f"{override}: {key} is not a config key ({hint}); + cannot add keys"
    return None


def check_overrides(schema: type, argv: list[str] | None = None, configs: Path = CONFIGS) -> None:
    """Exit with one line on stderr if a command-line override names a key that ``schema`` does not have.

    Checked: ``key=value``, ``+key=value``, ``++key=value`` and ``~key`` where ``key`` is not under ``hydra.``;
    top-level names may also be config groups (directories of ``configs/``, e.g. ``model=tiny``, ``+launcher=slurm``).
    """
    argv = sys.argv[1:] if argv is None else argv
    groups = tuple(p.name for p in configs.iterdir() if p.is_dir()) if configs.is_dir() else ()
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if arg.startswith("-") or not m or (m.group(3) == "" and m.group(1) != "~") or "/" in arg.split("=", 1)[0] or m.group(2).split(".")[0] == "hydra":
            continue
        message = unknown_key_message(m.group(2), arg, schema, groups)
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CONFIG)


class _Tee:
    """A text stream that writes to ``stream`` and appends to ``path``, line-flushed (stdout -> the log file)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: those of the console stream
        return getattr(self.stream, name)


def _only_hydra_files(run_dir: Path, log_name: str) -> bool:
    return run_dir.is_dir() and all(p.name in (".hydra", f"{log_name}.log") for p in run_dir.iterdir())


@contextmanager
def recipe_run(run_dir: str | Path, log_name: str) -> Iterator[None]:
    """Tee stdout into ``RUN_DIR/LOG_NAME.log``; turn ConfigError / DataError into one line and ``EXIT_CONFIG``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, run_dir / f"{log_name}.log")
    try:
        yield
    except (ConfigError, DataError) as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.file.close()
        sys.stdout = stdout
        if _only_hydra_files(run_dir, log_name):  # nothing of a run: leave no empty run dir behind
            shutil.rmtree(run_dir, ignore_errors=True)
        sys.exit(EXIT_CONFIG)
    finally:
        if isinstance(sys.stdout, _Tee):
            sys.stdout.flush()
            sys.stdout.file.close()
            sys.stdout = stdout

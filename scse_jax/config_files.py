"""Config files and `--config.field=value` overrides, read as launch.py's config flag reads them.

The one override syntax of every command: `--config.train.num_epochs=2`. Values parse by the
field's type as ml_collections' config_flags parses them (a tuple from `a,b` or `("a", "b")`,
booleans from true/false), so an override means the same to launch.py and to experiment.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections.config_flags import config_path, tuple_parser

from scse_jax.errors import ConfigError

OVERRIDE_PREFIX = "--config."

_PARSERS = {
    bool: flags.BooleanParser(),
    int: flags.IntegerParser(),
    float: flags.FloatParser(),
    str: flags.ArgumentParser(),
    tuple: tuple_parser.TupleParser(),
}


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, as ``launch.py --config`` would load it."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    project_root = str(path.parent.parent)
    if project_root not in sys.path:
        sys.path.insert(0, project_root)  # configs import configs.default
    spec = importlib.util.spec_from_file_location(f"_config_file_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def is_override(argument: str) -> bool:
    return argument.startswith(OVERRIDE_PREFIX)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies each ``--config.group.field=value`` to `config`, in order."""
    for override in overrides:
        if not is_override(override) or "=" not in override:
            raise ConfigError(f"{override!r}: expected {OVERRIDE_PREFIX}group.field=value")
        field, text = override[len(OVERRIDE_PREFIX):].split("=", 1)
        try:
            field_type = config_path.get_type(field, config)
        except (AttributeError, KeyError) as error:
            raise ConfigError(f"--config.{field}: no such config field") from error
        try:
            config_path.set_value(field, config, _parse(text, field_type))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"--config.{field}={text}: {error}") from error


def _parse(text: str, field_type: type):
    parser = _PARSERS.get(field_type)
    if parser is not None:
        return parser.parse(text)
    try:  # a field whose default is None or a container: a Python literal, else a string
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text

"""How a stage's settings are declared: once, in the compute core, with a docstring and a range.

Each stage has one frozen dataclass of settings (``CacheSettings``, ``ShuffleSettings``,
``TrainSettings``, ``EvalSettings``, ``FeatureSettings``), in the module that does the work, in the
manner of sparsify's config dataclasses: every field says what it means and what values it takes.
Everything else reads them from there: the Dagster resources (``resources/``) are generated from
these fields, so the UI, every job, the sensors and the CLI share one vocabulary and one default.

A field is declared with :func:`setting` and checked by :func:`validate` when the dataclass is
built (its ``__post_init__``), so a bad value fails before anything is read or written, with an
error that names the setting, the value and the allowed range.

The same holds for what configures a deployment from outside: every ``SAE_PLATFORM_*``
environment value that is not a path is parsed by :func:`env_value` (typed, range-checked), and
every YAML file the platform reads (run configs, the sweep) by :func:`load_yaml`, which refuses
aliases (a "billion laughs" file of a few hundred bytes expands to gigabytes) and files over
``MAX_CONFIG_BYTES``.
"""

import math
import os
from dataclasses import MISSING, Field, field, fields
from pathlib import Path

import yaml

from sae_platform.errors import PlatformError


class SettingsError(PlatformError):
    """A setting is out of its declared range (raised before anything is written)."""


def setting(default, doc: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            choices: tuple | None = None, default_factory=None) -> Field:
    """A dataclass field with its documentation and allowed values.

    ``ge``/``gt``/``le`` bound numbers (which must also be finite), ``choices`` lists the allowed
    values; ``None`` as a default means "optional" (``None`` is then always allowed).
    """
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "choices": choices}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def doc(settings_class, name: str) -> str:
    return next(f for f in fields(settings_class) if f.name == name).metadata.get("doc", "")


def default_of(settings_class, name: str):
    """The declared default of one setting (what the CLI and the resources fall back to)."""
    declared = next(f for f in fields(settings_class) if f.name == name)
    return declared.default_factory() if declared.default is MISSING else declared.default


def allowed(metadata: dict, integer: bool = False) -> str:
    """The allowed range in words, e.g. 'an integer >= 1' or 'one of float16, float32'."""
    if metadata.get("choices"):
        return "one of " + ", ".join(map(str, metadata["choices"]))
    bounds = [f"{op} {_number(metadata[key])}" for key, op in (("gt", ">"), ("ge", ">="), ("le", "<="))
              if metadata.get(key) is not None]
    kind = "an integer" if integer else "a finite number"
    return f"{kind} " + " and ".join(bounds) if bounds else "any value"


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def validate(settings, section: str) -> None:
    """Check every declared field of ``settings``; ``section`` names where it is set (e.g.
    ``resources.training.config``) so that the error says exactly what to change."""
    for declared in fields(settings):
        value, meta = getattr(settings, declared.name), declared.metadata
        if value is None or not meta:
            continue
        problem = _problem(value, meta)
        if problem:
            default = default_of(type(settings), declared.name)
            rule = allowed(meta, integer=declared.type in (int, int | None))
            raise SettingsError(f"{section}.{declared.name} = {value!r} {problem}: it must be {rule}",
                                f"set {section}.{declared.name} to {rule} (default {default!r}"
                                + (", i.e. unset" if default is None else "") + ")")


def _problem(value, meta: dict) -> str | None:
    if meta.get("choices") is not None:
        return None if value in meta["choices"] else "is not allowed"
    bounded = any(meta.get(key) is not None for key in ("ge", "gt", "le"))
    if not bounded:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "is not a number"
    if not math.isfinite(value):
        return "is not finite"
    if meta.get("ge") is not None and value < meta["ge"]:
        return "is too small"
    if meta.get("gt") is not None and value <= meta["gt"]:
        return "is too small"
    if meta.get("le") is not None and value > meta["le"]:
        return "is too large"
    return None


# -- environment values ---------------------------------------------------------------------------

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def env_value(variable: str, default, kind: type = str, *, ge: float | None = None, gt: float | None = None,
              le: float | None = None, choices: tuple | None = None):
    """The environment value ``variable`` as ``kind`` (int, float, bool or str), ``default`` when it
    is unset or blank. Numbers are checked against ``ge``/``gt``/``le`` (and must be finite), strings
    against ``choices``. Read when the module that needs it loads, so a bad value stops the code
    location, a CLI command or a worker before anything runs. SettingsError naming the variable,
    the value and the allowed range otherwise."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    meta = {"ge": ge, "gt": gt, "le": le, "choices": choices}
    value = _parse_env(raw, kind)
    problem = f"is not {_KIND_WORDS[kind]}" if value is None else _problem(value, meta)
    if problem:
        rule = ("one of " + ", ".join(TRUE_WORDS + FALSE_WORDS)) if kind is bool else allowed(meta, kind is int)
        raise SettingsError(f"environment variable {variable}={raw!r} {problem}: it must be {rule}",
                            f"set {variable} to {rule}, or unset it for the default ({default!r})")
    return value


def _parse_env(raw: str, kind: type):
    """``raw`` as ``kind``; None when it is not one."""
    if kind is bool:
        word = raw.lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
    try:
        return kind(raw)
    except ValueError:
        return None


# -- configuration files ------------------------------------------------------------------------

MAX_CONFIG_BYTES = 1 << 20  # a run config or sweep file; the repository's are a few kB


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader with aliases refused: ``*name`` (and ``<<: *name``) would let a small
    file stand for an exponentially large document (the "billion laughs" attack)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SettingsError(f"{self.name}: line {event.start_mark.line + 1} uses the YAML alias "
                                f"*{event.anchor}, which configuration files may not use",
                                "write the value out in full where the alias stands (and drop its &anchor)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is refused (PyYAML keeps the last one silently: a setting typed twice
        would quietly lose the first)."""
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise SettingsError(
                            f"{self.name}: line {key_node.start_mark.line + 1} sets {key_node.value!r} again "
                            f"(first set on line {seen[key_node.value] + 1})", "keep one of the two")
                    seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path, what: str):
    """The YAML document in ``path`` (``what`` says which configuration it is, for errors): safe tags
    only, no aliases, at most ``MAX_CONFIG_BYTES``. SettingsError naming the file and the fix when it
    is missing, too large, not YAML, or uses an alias."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise SettingsError(f"{what} {path} cannot be read ({error.strerror or error})",
                            f"point it at an existing {what} file") from error
    if size > MAX_CONFIG_BYTES:
        raise SettingsError(f"{what} {path} is {size:,} bytes, more than the {MAX_CONFIG_BYTES:,} a configuration "
                            "file may have", "check that it is the right file; split it or shorten it")
    with path.open("rb") as stream:
        loader = None
        try:
            loader = _NoAliasLoader(stream)  # reads the first bytes: a non-UTF-8 file fails here
            loader.name = str(path)
            return loader.get_single_data()
        except yaml.YAMLError as error:  # non-UTF-8 bytes included (a ReaderError)
            raise SettingsError(f"{what} {path} is not valid YAML: {error}",
                                "fix the YAML at the line named above") from error
        except RecursionError:
            raise SettingsError(f"{what} {path} nests lists or mappings too deeply to read",
                                "a configuration needs a few levels; check that it is the right file") from None
        except ValueError as error:  # e.g. an integer of more than 4,300 digits
            raise SettingsError(f"{what} {path} holds a value that cannot be read: {str(error).split(';')[0]}",
                                "write the value as a quoted string, or fix it") from None
        finally:
            if loader is not None:
                loader.dispose()


DEVICE_DOC = "auto (CUDA when present), cpu, cuda, cuda:1, …"
DEFAULT_DEVICE = "auto"


def read_run_config(path: str | None) -> dict:
    """A full_pipeline run config file (``SAE_PLATFORM_RUN_CONFIG``, e.g. config/demo.yaml); {} for none."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"run config {path} (SAE_PLATFORM_RUN_CONFIG) does not exist: "
                                "point it at a full_pipeline run config such as config/demo.yaml")
    config = load_yaml(path, "run config (SAE_PLATFORM_RUN_CONFIG)") or {}
    if not isinstance(config, dict):
        raise SettingsError(f"run config {path} (SAE_PLATFORM_RUN_CONFIG) is a {type(config).__name__}, not a mapping",
                            "write a full_pipeline run config (resources:, ops:, execution:) like config/demo.yaml")
    return config

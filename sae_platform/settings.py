"""How a stage's settings are declared: once, in the compute core, with a docstring and a range.

Each stage has one frozen dataclass of settings (``CacheSettings``, ``ShuffleSettings``,
``TrainSettings``, ``EvalSettings``, ``FeatureSettings``), in the module that does the work, in the
manner of sparsify's config dataclasses: every field says what it means and what values it takes.
Everything else reads them from there: the Dagster resources (``resources/``) are generated from
these fields, so the UI, every job, the sensors and the CLI share one vocabulary and one default.

A field is declared with :func:`setting` and checked by :func:`validate` when the dataclass is
built (its ``__post_init__``), so a bad value fails before anything is read or written, with an
error that names the setting, the value and the allowed range.
"""

import math
from dataclasses import MISSING, Field, field, fields

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


DEVICE_DOC = "auto (CUDA when present), cpu, cuda, cuda:1, …"
DEFAULT_DEVICE = "auto"

"""Click options generated from a config dataclass: one flag per field, its help, default and kind
from the field (``trajdata.config.option``), its value through the config's own coercion."""
from __future__ import annotations

import dataclasses

import click

from trajdata.config import coerce, default, field_kind, option_meta

_KIND_NAMES = {("int",): "INTEGER", ("float",): "FLOAT", ("str",): "TEXT", ("count",): "COUNT",
               ("floats",): "C,C,..."}


class FieldType(click.ParamType):
    """A flag's text through ``trajdata.config.coerce``: a wrong type on the command line is the
    same one-line ``ConfigError`` (naming the flag) as in a TOML file."""

    def __init__(self, cls, field: str, metavar: str):
        self.cls, self.field, self.name = cls, field, metavar

    def get_metavar(self, param, ctx=None) -> str:
        return self.name

    def convert(self, value, param, ctx):
        return coerce(self.cls, self.field, value)


def field_option(cls, fld: dataclasses.Field, default_value=dataclasses.MISSING):
    """The ``click.option`` of one config field."""
    meta = option_meta(fld)
    name = (meta["flag"] or fld.name).replace("_", "-")
    has_default = fld.default is not dataclasses.MISSING or fld.default_factory is not dataclasses.MISSING
    required = meta["required"] or not has_default
    if default_value is dataclasses.MISSING:
        default_value = default(cls, fld.name) if has_default else None
    d = default_value
    kinds, _ = field_kind(fld)
    if kinds == ("bool",):
        return click.option(f"--{name}/--no-{name}", fld.name, default=d, show_default=True, help=meta["help"])
    metavar = meta["metavar"] or ("[" + "|".join(map(str, meta["choices"])) + "]" if meta["choices"]
                                  else _KIND_NAMES.get(kinds, "TEXT"))
    shown = d not in (None, "", ())
    return click.option(f"--{name}", fld.name, type=FieldType(cls, fld.name, metavar), required=required,
                        default=None if required else d, show_default=shown, help=meta["help"])


def dataclass_options(cls, skip=(), only=None, defaults: dict | None = None):
    """A decorator adding a flag for every field of ``cls`` declared for the command line (not
    ``skip``ped; only those in ``only`` when given), in field order; ``defaults`` overrides a
    field's default for this command."""
    defaults = defaults or {}
    chosen = [f for f in dataclasses.fields(cls) if option_meta(f)["cli"] and f.name not in skip
              and (only is None or f.name in only)]
    missing = set(only or ()) - {f.name for f in chosen}
    if missing:
        raise KeyError(f"{cls.__name__} has no command-line field {sorted(missing)[0]!r}")

    def decorate(f):
        for fld in reversed(chosen):
            f = field_option(cls, fld, defaults.get(fld.name, dataclasses.MISSING))(f)
        return f

    return decorate

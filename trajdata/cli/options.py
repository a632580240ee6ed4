"""Click options generated from a config dataclass: one flag per field, defaults from the dataclass."""
from __future__ import annotations

import dataclasses

import click

from trajdata.config import default


def dataclass_options(cls, helps: dict[str, str], skip=(), special: dict | None = None):
    """A decorator adding ``--field-name`` for every field of ``cls`` not in ``skip``: bools as
    ``--x/--no-x``, others typed from the annotation; ``special[name]`` gives a field's own
    ``click.option`` keyword arguments (type, default, ...)."""
    special = special or {}

    def decorate(f):
        for fld in reversed([x for x in dataclasses.fields(cls) if x.name not in skip]):
            dash = fld.name.replace("_", "-")
            d = default(cls, fld.name)
            kind = str(fld.type)
            if fld.name in special:
                f = click.option(f"--{dash}", fld.name, help=helps[fld.name], **special[fld.name])(f)
            elif kind == "bool":
                f = click.option(f"--{dash}/--no-{dash}", fld.name, default=d, show_default=True, help=helps[fld.name])(f)
            else:
                typ = int if "int" in kind else float if "float" in kind else str
                f = click.option(f"--{dash}", fld.name, type=typ, default=d, show_default=d is not None and d != "",
                                 help=helps[fld.name])(f)
        return f

    return decorate

"""Command-line flags built from a method's options dataclass, and parsed flags back into it.

A field declared with :func:`filtersurgery.engine.registry.option` (``flag``, ``help``,
``choices``, ``metavar``, ``type``, ``dest``) becomes one ``argparse`` argument;
:func:`add_options` adds them, :func:`options_from_args` builds the dataclass from the
parsed namespace. Fields without a ``flag`` have no flag and keep their defaults.
:class:`~filtersurgery.engine.config.TrainConfig`, the multi-step methods'
``MultiStepConfig`` and each single-run method's options (the flags of ``filtersurgery run``)
are all built this way.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from filtersurgery.engine.registry import OPTION_KEY

__all__ = ["OptionAction", "add_options", "options_from_args", "option_fields", "flag_dest"]


class OptionAction(argparse.Action):
    """Stores the flag's value (``const`` for a switch: a flag without a value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def flag_dest(flag: str) -> str:
    """The ``argparse`` destination of ``flag``: ``--reactivation-alpha`` -> ``reactivation_alpha``."""
    return flag.lstrip("-").replace("-", "_")


def _dest(meta: Dict[str, Any]) -> str:
    """The parsed attribute of an option: its ``dest``, else the flag's name."""
    return meta.get("dest") or flag_dest(meta["flag"])


def option_fields(cls, only: Optional[Sequence[str]] = None,
                  exclude: Sequence[str] = ()) -> List[Tuple[dataclasses.Field, Dict[str, Any]]]:
    """``(field, option metadata)`` of every field of the dataclass ``cls`` that has a flag, in field order.

    ``only``: just these field names (in this order); ``exclude``: leave these out.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"cls: must be an options dataclass, got {cls!r}")
    flagged = {f.name: (f, f.metadata[OPTION_KEY]) for f in dataclasses.fields(cls)
               if f.metadata.get(OPTION_KEY, {}).get("flag")}
    unknown = [n for n in list(only or ()) + list(exclude) if n not in flagged]
    if unknown:
        raise ValueError(f"only/exclude: {unknown[0]!r} is not a field of {cls.__name__} with a flag "
                         f"(one of {', '.join(flagged)})")
    names = list(only) if only is not None else list(flagged)
    return [flagged[n] for n in names if n not in exclude]


def _one_line_type(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """``fn`` whose one-line ValueError becomes the flag's argparse error (``argument --lam: must be ...``)."""
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{f.name}: an option with a flag needs a default")


def _value_type(cls, f: dataclasses.Field):
    """The field's annotated type, ``Optional[X]`` read as ``X``."""
    t = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t


def _argument(cls, f: dataclasses.Field, meta: Dict[str, Any],
              help: Optional[str] = None) -> Tuple[List[str], Dict[str, Any]]:
    """The ``add_argument`` names and keywords of one field (``help``: instead of the field's own)."""
    default = _default(f)
    text = help if help is not None else meta["help"]
    kw: Dict[str, Any] = dict(dest=_dest(meta), default=default, help=text() if callable(text) else text,
                              action=OptionAction)
    vtype = meta["type"] or _value_type(cls, f)
    if vtype is bool:  # a switch: giving the flag stores the opposite of the default
        kw.update(nargs=0, const=not default)
    elif meta["type"] is not None and vtype not in (int, float, str):
        kw["type"] = _one_line_type(vtype)
    else:
        kw["type"] = vtype
    if meta["choices"] is not None:
        kw["choices"] = list(meta["choices"])
    if meta["metavar"] is not None:
        kw["metavar"] = meta["metavar"]
    elif meta["choices"] is None and kw.get("nargs") != 0:  # the metavar the flag had under its first name
        kw["metavar"] = flag_dest(meta["flag"]).upper()
    return [meta["flag"]], kw


def add_options(parser, cls, title: Optional[str] = None, description: Optional[str] = None, *,
                only: Optional[Sequence[str]] = None, exclude: Sequence[str] = (),
                help: Optional[Dict[str, str]] = None):
    """Add the flags of the options dataclass ``cls`` to ``parser`` (in a group ``title`` when given).

    ``only``/``exclude``: field names (:func:`option_fields`); ``help``: field name -> help
    text that replaces the field's own (a command that reads the option differently).
    Returns the group (or ``parser``).
    """
    target = parser.add_argument_group(title, description) if title else parser
    help = dict(help or {})
    for f, meta in option_fields(cls, only, exclude):
        names, kw = _argument(cls, f, meta, help.pop(f.name, None))
        target.add_argument(*names, **kw)
    if help:
        raise ValueError(f"help: {next(iter(help))!r} is not one of the flags added")
    return target


def options_from_args(cls, args: argparse.Namespace, **fixed):
    """The ``cls`` instance of parsed ``args`` (a flag missing from ``args``: the field's default).

    ``fixed``: field values that replace the parsed ones (a command's own settings).
    """
    values = {f.name: getattr(args, _dest(meta), _default(f)) for f, meta in option_fields(cls)}
    return cls(**{**values, **fixed})

"""The registry of single-run training methods, filled by importing the modules that implement them.

A method module in ``methods/`` registers itself at import::

    @dataclass
    class MyOptions:
        rate: float = option(0.1, flag="--my-rate", help="my method: the rate (default %(default)s)")

    def run_method(cfg: TrainConfig, options: MyOptions, out_dir, seed: int, data) -> dict: ...

    register(MethodSpec(("my-method",), MyOptions, run_method, help="my method: what it does"))

``filtersurgery/methods/__init__.py`` imports every method module and ``import filtersurgery``
imports ``filtersurgery.methods``, so the registry is complete once the package is imported.
The engine only reads names from here (:meth:`TrainConfig.validate`); it never imports a
method module. The command line builds each method's flags from its options dataclass
(``filtersurgery.cli.options``): a field's :func:`option` metadata names its flag, help
and choices.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = ["MethodSpec", "register", "get", "names", "specs", "training_lr_methods", "option", "SINGLE_RUN_METHODS",
           "register_plan", "plan_for", "MULTI_STEP_METHODS"]

OPTION_KEY = "cli"  # the dataclass field metadata key that :func:`option` fills


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One registered method family: its names, options dataclass, run function and help.

    ``run(cfg, options, out_dir, seed, data) -> metrics`` trains one seed of ``cfg.method``
    (one of ``names``) with ``options``, an instance of ``options`` (the dataclass), and
    writes ``metrics.json``. ``title`` names the family's group of CLI flags (default: the
    last part of the run function's module name). ``lr_is_training_lr``: ``--lr`` is the
    learning rate of the method's one training run (default ``TrainConfig.scratch_lr``);
    False: the method reads ``--lr`` otherwise (``sharing``: its branches' new-data lr).
    ``schedule``: the learning-rate schedule, in words for the start banner (``cosine``;
    growth: ``constant``). ``plan(cfg, options, data) -> [(step, Phase, labels)]``: the phases
    one seed trains, each on the training images with these labels (the command line's
    banner and duration estimate read it); None: not known before training (growth).
    """

    names: Union[str, Tuple[str, ...]]
    options: type
    run: Callable[..., Dict]
    help: str = ""
    title: str = ""
    lr_is_training_lr: bool = True
    schedule: str = "cosine"
    plan: Optional[Callable[..., Sequence[Tuple[int, Any, Any]]]] = None

    def __post_init__(self):
        names = (self.names,) if isinstance(self.names, str) else tuple(self.names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"names: must be one or more non-empty method names, got {self.names!r}")
        if not dataclasses.is_dataclass(self.options) or not isinstance(self.options, type):
            raise ValueError(f"options: must be a dataclass (the method's options), got {self.options!r}")
        if not callable(self.run):
            raise ValueError(f"run: must be callable as run(cfg, options, out_dir, seed, data), got {self.run!r}")
        if self.plan is not None and not callable(self.plan):
            raise ValueError(f"plan: must be None or callable as plan(cfg, options, data), got {self.plan!r}")
        object.__setattr__(self, "names", names)
        if not self.title:
            object.__setattr__(self, "title", self.run.__module__.rsplit(".", 1)[-1])

    @property
    def module(self) -> str:
        """The module that implements the method (where ``run`` is defined)."""
        return self.run.__module__


# method name -> spec, in registration order; the tables survive importlib.reload of this module
_BY_NAME: Dict[str, MethodSpec] = globals().get("_BY_NAME", {})


def _same(a: MethodSpec, b: MethodSpec) -> bool:
    """True when ``b`` is ``a`` registered again (its module imported a second time)."""
    return (a.module, a.run.__qualname__, a.names) == (b.module, b.run.__qualname__, b.names)


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` under each of its names; a name taken by another method is refused (one-line ValueError).

    Registering the same spec again (its module re-imported) replaces it. Returns ``spec``.
    """
    if not isinstance(spec, MethodSpec):
        raise ValueError(f"spec: must be a MethodSpec, got {type(spec).__name__}")
    for n in spec.names:
        old = _BY_NAME.get(n)
        if old is not None and not _same(old, spec):
            raise ValueError(f"names: method {n!r} is already registered by {old.module}")
    for n in spec.names:
        _BY_NAME[n] = spec
    return spec


def get(name: str) -> MethodSpec:
    """The spec registered under ``name`` (one-line KeyError naming the registered methods)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"method: {name!r} is not a registered single-run method (one of {', '.join(_BY_NAME)})") from None


def names() -> Tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(_BY_NAME)


def training_lr_methods() -> Tuple[str, ...]:
    """The registered single-run methods whose ``--lr`` is the lr of their one training run, in order."""
    return tuple(n for s in specs() if s.lr_is_training_lr for n in s.names)


def specs() -> Tuple[MethodSpec, ...]:
    """Every registered spec once, in registration order."""
    out = []
    for s in _BY_NAME.values():
        if not any(s is o for o in out):
            out.append(s)
    return tuple(out)


class _MethodModules(Mapping):
    """Read-only, live view ``method name -> module implementing it`` of the registry."""

    def __getitem__(self, name: str) -> str:
        return _BY_NAME[name].module

    def __contains__(self, name: object) -> bool:
        return name in _BY_NAME

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_BY_NAME))

    def __len__(self) -> int:
        return len(_BY_NAME)

    def __repr__(self) -> str:
        return f"SINGLE_RUN_METHODS({dict(self)!r})"


SINGLE_RUN_METHODS = _MethodModules()


# --------------------------------------------------------------------------- multi-step methods
_PLANS: Dict[str, Callable] = globals().get("_PLANS", {})  # multi-step name -> plan(cfg, options, step) -> phases (steps >= 2)


def register_plan(name: str, plan: Callable) -> Callable:
    """Register a multi-step method: ``plan(cfg, options, step) -> [Phase, ...]`` gives the phase objects of
    step ``step >= 2`` (``cfg``: the run's ``TrainConfig``, ``options``: its ``MultiStepConfig``; step 1,
    training from scratch on Data1, is the same for every method). The methods of
    ``methods/multistep/plans.py`` register themselves at import; a name may not be taken twice (by a
    multi-step or a single-run method). Returns ``plan``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: must be a non-empty string, got {name!r}")
    if not callable(plan):
        raise ValueError(f"plan: must be callable as plan(cfg, options, step), got {plan!r}")
    if name in _BY_NAME or (name in _PLANS and _PLANS[name] is not plan):
        raise ValueError(f"name: method {name!r} is already registered")
    _PLANS[name] = plan
    return plan


def plan_for(name: str) -> Callable:
    """The plan of the multi-step method ``name``; one-line ValueError naming the known ones."""
    if name not in _PLANS:
        raise ValueError(f"method: {name!r} is not a multi-step method (known: {', '.join(_PLANS)})")
    return _PLANS[name]


class _PlanNames(SequenceABC):
    """Read-only, live tuple-like view of the multi-step method names, in registration order."""

    def __getitem__(self, i):
        return tuple(_PLANS)[i]

    def __len__(self) -> int:
        return len(_PLANS)

    def __contains__(self, name: object) -> bool:
        return name in _PLANS

    def __add__(self, other) -> tuple:
        return tuple(self) + tuple(other)

    def __radd__(self, other) -> tuple:
        return tuple(other) + tuple(self)

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, _PlanNames)) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


MULTI_STEP_METHODS = _PlanNames()


def resume_fields(cls) -> List[str]:
    """The fields of the options dataclass ``cls`` declared with ``option(..., resume=True)``, in field order:
    the settings that must match for a re-run to resume into an existing run folder."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get(OPTION_KEY, {}).get("resume")]


def option(default: Any = dataclasses.MISSING, *, flag: Optional[str] = None, help: Union[str, Callable[[], str]] = "",
           choices: Optional[Sequence] = None, metavar: Optional[str] = None,
           type: Optional[Callable] = None, dest: Optional[str] = None, resume: bool = False) -> Any:
    """A dataclass field whose metadata describes its command-line flag.

    ``flag``: the flag (``--method-name``); ``help``: its argparse help (``%(default)s``
    allowed), or a function returning it when the parser is built (for help that lists
    registered methods); ``choices``/``metavar``/``type``: as for ``argparse.add_argument``
    (``type`` defaults to the field's annotation; a ``type`` function's one-line ValueError
    becomes the flag's error message); ``dest``: the parsed attribute (default: the flag's name,
    ``--my-rate`` -> ``my_rate``); ``resume``: the setting must match for a re-run to resume
    into an existing run folder. A boolean field's flag is a switch that stores the opposite
    of its default (``--no-msl`` for ``msl: bool = True``). A field without a ``flag`` has no
    command-line flag.
    """
    if flag is not None and not (isinstance(flag, str) and flag.startswith("--")):
        raise ValueError(f"flag: must start with '--', got {flag!r}")
    if not (isinstance(help, str) or callable(help)):
        raise ValueError(f"help: must be a string or a function returning one, got {help!r}")
    if dest is not None and not (isinstance(dest, str) and dest.isidentifier()):
        raise ValueError(f"dest: must be a Python identifier, got {dest!r}")
    meta = {OPTION_KEY: {"flag": flag, "help": help, "choices": None if choices is None else tuple(choices),
                         "metavar": metavar, "type": type, "dest": dest,
                         "resume": bool(resume)}}
    return dataclasses.field(default=default, metadata=meta)

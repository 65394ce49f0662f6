"""The method registry (engine/registry.py) and the flags built from options dataclasses (cli/options.py)."""
import argparse
import ast
import inspect
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import pytest

from conftest import ROOT, subcommands

import filtersurgery
from filtersurgery import train
from filtersurgery.cli.main import main
from filtersurgery.cli.options import add_options, options_from_args
from filtersurgery.engine import registry
from filtersurgery.engine.registry import MethodSpec, option
from filtersurgery.methods.growth import GrowthConfig
from filtersurgery.methods.reactivation import ReactivationMethodConfig
from filtersurgery.methods.sharing import SharingConfig

ALL = ("plain", "reactivation", "weight-evolution", "filter-grafting", "sharing", "class-finetune", "growth")


def _run_parser():
    return subcommands()["run"]


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test (tests may register methods)."""
    monkeypatch.setattr(registry, "_BY_NAME", dict(registry._BY_NAME))


# ------------------------------------------------------------------ the registry
def test_import_filtersurgery_registers_every_method_in_order():
    assert registry.names() == ALL
    assert tuple(train.SINGLE_RUN_METHODS) == ALL
    assert dict(train.SINGLE_RUN_METHODS) == {
        **{m: "filtersurgery.methods.reactivation" for m in ALL[:4]},
        "sharing": "filtersurgery.methods.sharing", "class-finetune": "filtersurgery.methods.sharing",
        "growth": "filtersurgery.methods.growth"}
    assert [s.options for s in registry.specs()] == [ReactivationMethodConfig, SharingConfig, GrowthConfig]
    assert [s.title for s in registry.specs()] == ["reactivation", "sharing", "growth"]
    with pytest.raises(TypeError):
        train.SINGLE_RUN_METHODS["mine"] = "x"  # a read-only view


def test_engine_alone_sees_the_full_registry():
    code = "from filtersurgery.engine import config; print(','.join(config.SINGLE_RUN_METHODS))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ",".join(ALL)


def test_run_functions_take_options_not_a_namespace():
    for spec in registry.specs():
        assert list(inspect.signature(spec.run).parameters) == ["cfg", "options", "out_dir", "seed", "data"]


def test_no_argparse_in_the_library_below_cli():
    pkg = Path(filtersurgery.__file__).parent
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        if "cli" in path.relative_to(pkg).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "argparse"]
    assert not bad, bad


def test_register_refuses_a_taken_name_and_accepts_a_new_method(scratch_registry):
    @dataclass
    class Opts:
        rate: float = option(0.5, flag="--toy-rate", help="toy: a rate (default %(default)s)")

    def run(cfg, options, out_dir, seed, data):
        return {"rate": options.rate}

    with pytest.raises(ValueError, match="'growth' is already registered by filtersurgery.methods.growth"):
        registry.register(MethodSpec(("toy", "growth"), Opts, run))
    assert "toy" not in registry.names()  # nothing half-registered
    registry.register(MethodSpec("toy", Opts, run, help="a toy method"))
    registry.register(MethodSpec("toy", Opts, run, help="a toy method"))  # its module imported again: fine
    assert registry.names() == ALL + ("toy",) and registry.get("toy").title == "test_registry"
    train.TrainConfig(method="toy").validate()  # the engine accepts it without knowing its module
    p = _run_parser()
    args = p.parse_args(["--method", "toy", "--toy-rate", "0.25"])
    assert registry.get("toy").run(None, options_from_args(Opts, args), None, 0, None) == {"rate": 0.25}
    with pytest.raises(KeyError, match="'nope' is not a registered single-run method"):
        registry.get("nope")


@pytest.mark.parametrize("bad, match", [
    (dict(names=()), "names"), (dict(options=dict), "options"), (dict(run=1), "run"), (dict(plan=3), "plan")])
def test_method_spec_refuses_bad_fields(bad, match):
    spec = dict(names="x", options=GrowthConfig, run=lambda *a: {})
    with pytest.raises(ValueError, match=f"^{match}:"):
        MethodSpec(**{**spec, **bad})


def test_unknown_method_error_lists_every_method():
    with pytest.raises(ValueError) as e:
        train.TrainConfig(method="nope").validate()
    assert str(e.value) == f"method: must be one of {', '.join(train.METHODS + ALL)}, got 'nope'"


# ------------------------------------------------------------------ the flag builder
@dataclass
class Toy:
    """Options of a toy method."""

    rate: float = option(0.1, flag="--toy-rate", help="toy rate (default %(default)s)")
    kind: str = option("a", flag="--toy-kind", choices=("a", "b"), help="toy kind (default %(default)s)")
    sets: Optional[str] = option(None, flag="--toy-sets", metavar="N,N", help="toy sets")
    fast: bool = option(False, flag="--toy-fast", help="toy switch")
    hidden: int = 7  # no flag


def _toy(argv):
    p = argparse.ArgumentParser()
    add_options(p, Toy, title="toy options")
    return p, p.parse_args(argv)


def test_builder_round_trips_a_dataclass():
    p, args = _toy([])
    assert options_from_args(Toy, args) == Toy()
    _, args = _toy(["--toy-rate", "0.5", "--toy-kind", "b", "--toy-sets", "1,2", "--toy-fast"])
    assert options_from_args(Toy, args) == Toy(rate=0.5, kind="b", sets="1,2", fast=True)
    acts = {a.dest: a for a in p._actions}
    assert "hidden" not in acts and acts["toy_rate"].type is float and acts["toy_sets"].type is str
    assert acts["toy_kind"].choices == ["a", "b"] and acts["toy_sets"].metavar == "N,N"
    assert acts["toy_rate"].option_strings == ["--toy-rate"] and acts["toy_rate"].metavar == "TOY_RATE"
    assert options_from_args(Toy, argparse.Namespace()) == Toy()  # flags missing from args: the defaults
    with pytest.raises(SystemExit):
        _toy(["--toy-kind", "c"])


def test_run_has_every_method_flag_with_the_dataclass_defaults():
    acts = {s: a for a in _run_parser()._actions for s in a.option_strings}
    for spec in registry.specs():
        for f in fields(spec.options):
            meta = f.metadata.get(registry.OPTION_KEY)
            if meta is None:
                continue
            flag = meta["flag"]
            assert acts[flag].default == f.default and acts[flag].help == meta["help"], flag
            assert acts[flag].option_strings == [flag]  # one name per flag: no old aliases


def test_sweep_sharing_lives_in_cli():
    from filtersurgery.cli import sweep

    assert subcommands()["sweep-sharing"].get_default("func") is sweep.cmd_sweep


def test_multi_step_methods_are_registered_plans():
    from filtersurgery.engine import registry
    from filtersurgery.train import METHODS, MultiStepConfig, TrainConfig, plan_step

    assert tuple(METHODS) == ("framework", "finetune", "bst", "dml", "lwm", "joint", "shrink-perturb", "dash")

    def plan(cfg, options, step):
        return [registry.plan_for("finetune")(cfg, options, step)[0]]

    registry.register_plan("test-finetune-copy", plan)
    try:
        assert "test-finetune-copy" in METHODS and METHODS[-1] == "test-finetune-copy"
        cfg, opts = TrainConfig(method="test-finetune-copy"), MultiStepConfig()
        cfg.validate()
        assert [p.kind for p in plan_step(cfg, opts, 1)] == ["scratch"]
        assert [(p.kind, p.parts) for p in plan_step(cfg, opts, 3)] == [("finetune", [2])]
        with pytest.raises(ValueError, match="already registered"):
            registry.register_plan("framework", plan)
        with pytest.raises(ValueError, match="already registered"):
            registry.register_plan("growth", plan)  # a single-run method's name
    finally:
        registry._PLANS.pop("test-finetune-copy", None)
    assert "test-finetune-copy" not in METHODS


def test_the_trainer_docs_label_smoothing_example_trains(tmp_path):
    """docs/trainer.md's new phase kind: a FineTune subclass with its own loss, registered as a plan, runs."""
    text = (ROOT / "docs" / "trainer.md").read_text()
    block = next(b.split("```", 1)[0] for b in text.split("```python")[1:] if "LabelSmoothing" in b)
    ns = {}
    try:
        exec(compile(block, "docs/trainer.md", "exec"), ns)
        cfg = train.TrainConfig(model="cifar:resnet20", data="demo", steps=2, method="smooth", epochs=1, subset=8,
                                batch_size=4, max_batches=1, device="cpu", progress=False)
        m = train.multi_step(cfg, tmp_path, seed=0)
        assert [s["phases"] for s in m["steps"]] == [["scratch"], ["smooth"]]
        assert type(train.plan_step(cfg, train.MultiStepConfig(), 2)[0]).__name__ == "LabelSmoothing"
    finally:
        registry._PLANS.pop("smooth", None)


# ----------------------------------------------------------------------------- TrainConfig's flags
def _train_flags(cls=None):
    """``(field name, option metadata)`` of every TrainConfig (or ``cls``) field that has a flag."""
    from filtersurgery.cli.options import option_fields
    from filtersurgery.train import TrainConfig

    return [(f.name, meta) for f, meta in option_fields(cls or TrainConfig)]


def test_every_run_flag_comes_from_a_dataclass_field():
    """``filtersurgery run``'s flags are TrainConfig's, MultiStepConfig's and the methods' option fields, plus
    --seeds/--out."""
    from filtersurgery.cli.options import option_fields
    from filtersurgery.train import MultiStepConfig

    built = {meta["flag"] for _, meta in _train_flags() + _train_flags(MultiStepConfig)}
    for spec in registry.specs():
        built |= {meta["flag"] for _, meta in option_fields(spec.options)}
    flags = {s for a in _run_parser()._actions for s in a.option_strings if s.startswith("--")}
    assert flags - built == {"--help", "--seeds", "--out"}
    assert built - flags == set()


def _non_default(name, meta, field_default):
    """A command-line value for flag ``meta['flag']`` that differs from ``field_default`` and its parsed value."""
    if meta["choices"] is not None:
        value = next(c for c in meta["choices"] if c != field_default)
        return [str(value)], value
    table = {"model": "cifar:resnet8", "data": "demo", "data_root": "/tmp/x", "method": "finetune",
             "device": "cpu", "lam": "0.25", "image_size": "40"}
    if isinstance(field_default, bool):
        return [], not field_default
    if name in table:
        text = table[name]
        return [text], {"lam": 0.25, "image_size": 40}.get(name, text)
    if isinstance(field_default, float) or name in ("lr", "dash_alpha"):
        return ["0.0625"], 0.0625
    return ["3"], 3


def test_every_train_flag_round_trips_into_train_config():
    """Each TrainConfig flag, given a non-default value, sets exactly its field (switches store the opposite)."""
    from filtersurgery.cli.run import config_from_args
    from filtersurgery.train import TrainConfig

    defaults = TrainConfig()
    parser = _run_parser()
    for name, meta in _train_flags():
        argv, want = _non_default(name, meta, getattr(defaults, name))
        cfg = config_from_args(parser.parse_args([meta["flag"], *argv]))
        assert getattr(cfg, name) == want, name
        changed = {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}
        assert changed == ({"split", "steps"} if name == "split" else {name}), (name, changed)  # single: 2 steps


def test_every_multi_step_flag_round_trips_into_multi_step_config():
    """Each MultiStepConfig flag, given a non-default value, sets exactly its field (``--recipe paper`` also the
    paper's value of every setting at its library default)."""
    from filtersurgery.cli.run import config_from_args, method_options
    from filtersurgery.train import PAPER_RECIPE, MultiStepConfig

    defaults = MultiStepConfig()
    parser = _run_parser()
    for name, meta in _train_flags(MultiStepConfig):
        argv, want = _non_default(name, meta, getattr(defaults, name))
        args = parser.parse_args([meta["flag"], *argv])
        opts = method_options(config_from_args(args), args)
        assert isinstance(opts, MultiStepConfig) and getattr(opts, name) == want, name
        changed = {f.name for f in fields(MultiStepConfig) if getattr(opts, f.name) != getattr(defaults, f.name)}
        extra = {k for k, v in PAPER_RECIPE.items() if v != getattr(defaults, k)} if name == "recipe" else set()
        assert changed == {name} | extra, (name, changed)


def test_run_steps_default_follows_the_split():
    from filtersurgery.cli.run import config_from_args

    parser = _run_parser()
    assert config_from_args(parser.parse_args([])).steps == 4
    assert config_from_args(parser.parse_args(["--split", "single"])).steps == 2
    assert config_from_args(parser.parse_args(["--steps", "3"])).steps == 3


def test_resume_keys_are_the_fields_marked_resume():
    """The settings that must match to resume into an --out: declared on the fields, runtime ones not among them."""
    from filtersurgery.cli.run import resume_keys

    from filtersurgery.train import MultiStepConfig

    keys = resume_keys(MultiStepConfig)
    assert {"model", "data", "method", "epochs", "lr", "lam", "msl", "students", "e_cut_fraction", "sst_update",
            "refresh_bn", "recipe"} <= set(keys)
    assert not {"device", "amp", "channels_last", "progress", "data_root", "download"} & set(keys)
    assert keys == [n for n, meta in _train_flags() + _train_flags(MultiStepConfig) if meta["resume"]]


def test_lr_help_lists_the_methods_registered_as_training_lr():
    helps = {a.dest: a.help for a in _run_parser()._actions}
    for name in registry.training_lr_methods():
        assert name in helps["lr"]
    assert registry.training_lr_methods() == ("plain", "reactivation", "weight-evolution", "filter-grafting", "growth")
    assert all(m in helps["method"] for m in train.METHODS + tuple(registry.names()))


def test_a_type_function_error_is_the_flag_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--lam", "often"])
    assert exit_.value.code == 2
    assert "argument --lam: must be 'auto' or a number >= 0, got 'often'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [(dict(dest="not valid"), "dest"), (dict(help=3), "help")])
def test_option_refuses_bad_metadata(kwargs, match):
    with pytest.raises(ValueError, match=match):
        option(1, flag="--x", **kwargs)


def test_add_options_refuses_unknown_names():
    from filtersurgery.train import TrainConfig

    with pytest.raises(ValueError, match="only/exclude: 'nope'"):
        add_options(argparse.ArgumentParser(), TrainConfig, only=("nope",))
    with pytest.raises(ValueError, match="help: 'scratch_lr'"):  # a field without a flag
        add_options(argparse.ArgumentParser(), TrainConfig, only=("epochs",), help={"scratch_lr": "x"})


def test_sweep_sharing_flags_are_train_config_fields_with_their_own_help():
    helps = {a.dest: a.help for a in subcommands()["sweep-sharing"]._actions}
    assert helps["lr"].startswith("branch learning rate") and helps["epochs"].startswith("epochs per network")
    assert "device" in helps and "progress" in helps and "method" not in helps


def test_registries_survive_reloading_their_modules():
    """importlib.reload of engine/registry.py keeps every registered method and plan (run in a fresh interpreter:
    reloading replaces classes other tests use)."""
    import subprocess

    code = ("import importlib, filtersurgery\n"
            "from filtersurgery.engine import registry\n"
            "def tables():\n"
            "    return (registry.names(), tuple(registry.MULTI_STEP_METHODS))\n"
            "before = tables()\n"
            "importlib.reload(registry)\n"
            "assert tables() == before, (tables(), before)\n"
            "assert 'growth' in registry.names() and 'framework' in registry.MULTI_STEP_METHODS\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_method_plan_gives_the_banner_its_phases(scratch_registry):
    """console.plan_run reads a single-run method's phases from its spec's plan (no name-switch in the CLI)."""
    from filtersurgery.cli import console
    from filtersurgery.data import load_dataset
    from filtersurgery.train import FineTune, Scratch, TrainConfig

    @dataclass
    class Opts:
        pass

    def plan(cfg, options, data):
        half = data.train_y[data.train_y < 5]
        return [(1, Scratch("first", [0], 0.1, cfg.epochs), half),
                (2, FineTune("second", [0], 0.01, 2 * cfg.epochs), data.train_y)]

    registry.register(MethodSpec("toy-planned", Opts, lambda *a: {}, plan=plan))
    registry.register(MethodSpec("toy-unplanned", Opts, lambda *a: {}))
    data = load_dataset("demo")
    cfg = TrainConfig(method="toy-planned", data="demo", epochs=3, subset=None)
    phases = console.plan_run(cfg, data)
    assert [(p.step, p.name, p.kind, p.epochs) for p in phases] == [(1, "first", "scratch", 3), (2, "second", "finetune", 6)]
    assert phases[0].train_images + phases[0].val_images == int((data.train_y < 5).sum())
    assert phases[1].train_images + phases[1].val_images == len(data.train_y)
    assert console.plan_run(TrainConfig(method="toy-unplanned", data="demo"), data) == []
    reactivation = console.plan_run(TrainConfig(method="filter-grafting", data="demo", epochs=2), data)
    assert [(p.name, p.kind, p.epochs) for p in reactivation] == [("train", "scratch2", 2)]
    sharing = console.plan_run(TrainConfig(method="sharing", data="demo"), data, options=SharingConfig(class_sets="5,5"))
    assert [(p.step, p.name) for p in sharing] == [(1, "base"), (2, "branch")]

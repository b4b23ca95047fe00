"""The command line: overrides anywhere on the line; one-line user errors, tracebacks for bugs."""

from __future__ import annotations

from pathlib import Path

import pytest

import zotune
import zotune.config
from zotune import cli
from zotune.errors import ZotuneError


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: tiny-llama\ntask:\n  name: sst2\ntrain:\n  steps: 4\noptim:\n  lr: 1.0e-5\n")
    return path


@pytest.fixture
def ran(monkeypatch):
    """Replace the commands by a recorder of the config and options they were given."""
    seen = {}

    def record(args):
        seen["cfg"], seen["args"] = cli._config(args), args
        return 0

    for name in ("cmd_train", "cmd_eval", "cmd_validate"):
        monkeypatch.setattr(cli, name, record)
    return seen


@pytest.mark.parametrize("command", ["train", "eval", "validate"])
def test_overrides_may_follow_options_and_come_in_any_order(command, recipe, tmp_path, ran):
    argv = [command, "optim.lr=1e-5", "--debug", str(recipe), "train.steps=7", "optim.lr=2e-5"]
    if command == "eval":  # options between the recipe and the overrides, and between overrides
        argv[2:2] = ["--split", "dev"]
        argv[-1:-1] = ["--checkpoint", str(tmp_path / "ck")]
    assert cli.main(argv) == 0
    cfg, args = ran["cfg"], ran["args"]
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.name) == (7, 2e-5, "tiny-llama")  # the last one wins
    if command == "eval":
        assert (args.checkpoint, args.split) == (str(tmp_path / "ck"), "dev")


def test_eval_with_overrides_after_the_checkpoint_option(recipe, tmp_path, ran):
    # the order users write (issue 9, defect 10): recipe, option, then overrides
    assert cli.main(["eval", str(recipe), "--checkpoint", str(tmp_path), "task.test=8", "task.dev=4"]) == 0
    assert (ran["cfg"].task.test, ran["cfg"].task.dev, ran["args"].checkpoint) == (8, 4, str(tmp_path))


def test_an_unknown_option_is_still_refused(recipe, ran, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", str(recipe), "--nope", "train.steps=3"])
    assert e.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # commands without overrides take no stray words
        cli.main(["replay", "run", "extra"])


PROJECT_ERRORS = {
    "ConfigError": (zotune.config.ConfigError, ValueError),
    "CheckpointError": ("zotune.train.checkpoint", RuntimeError),
    "DistributedError": ("zotune.distributed", RuntimeError),
    "UnknownTaskError": ("zotune.tasks.registry", KeyError),
    "TemplateError": ("zotune.tasks.registry", ValueError),
    "DataFormatError": ("zotune.tasks.formats", ValueError),
    "ModelLoadError": ("zotune.models", OSError),
}


@pytest.mark.parametrize("name", list(PROJECT_ERRORS))
def test_project_errors_derive_from_zotune_error_and_keep_their_builtin_base(name):
    import importlib

    where, builtin = PROJECT_ERRORS[name]
    cls = where if isinstance(where, type) else getattr(importlib.import_module(where), name)
    assert issubclass(cls, ZotuneError) and issubclass(cls, builtin)


def failing(monkeypatch, exc):
    def load_config(*a, **k):
        raise exc
    monkeypatch.setattr(zotune.config, "load_config", load_config)


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("a bug"), OSError("a bug"),
                                 ValueError("a bug outside zotune")])
def test_a_real_bug_keeps_its_traceback(monkeypatch, recipe, exc):
    failing(monkeypatch, exc)
    with pytest.raises(type(exc), match="a bug"):
        cli.main(["validate", str(recipe)])


def test_a_project_error_is_one_line_with_exit_status_2(tmp_path, capsys):
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"zotune: error: config file not found: {tmp_path / 'missing.yaml'}\n"
    assert cli.main(["validate", "optim.method=mezzo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zotune: error:") and "Did you mean 'mezo'" in err and "Traceback" not in err


def test_a_missing_checkpoint_folder_is_one_line_before_the_model_loads(recipe, tmp_path, capsys, monkeypatch):
    import zotune.train.loop as loop

    monkeypatch.setattr(loop, "build", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["eval", str(recipe), "--checkpoint", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"zotune: error: --checkpoint {tmp_path / 'nope'} does not exist\n"
    assert cli.main(["eval", str(recipe), "--checkpoint", str(tmp_path)]) == 2
    assert "is not a checkpoint (no meta.json" in capsys.readouterr().err


def test_a_non_finite_loss_is_a_user_error(monkeypatch, recipe, capsys):
    failing(monkeypatch, zotune.NonFiniteLossError("loss is nan: lower optim.lr"))
    assert cli.main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err == "zotune: error: loss is nan: lower optim.lr\n"


@pytest.mark.parametrize("how", ["--debug", "ZOTUNE_DEBUG=1"])
def test_debug_prints_the_traceback_of_a_project_error_too(how, tmp_path, capsys, monkeypatch):
    argv = ["validate", str(tmp_path / "missing.yaml")]
    if how == "--debug":
        argv.append("--debug")
    else:
        monkeypatch.setenv("ZOTUNE_DEBUG", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "ConfigError" in err
    assert err.endswith(f"zotune: error: config file not found: {tmp_path / 'missing.yaml'}\n")


def test_only_errors_zotune_raises_on_purpose_are_user_errors():
    # ValueError / FileNotFoundError name a bad value or a missing file when zotune raises them
    # (the style of its argument checks); raised by Python inside zotune's code they are bugs
    probe = compile(
        "def on_purpose(): raise ValueError('optim.lr must be > 0, got -1')\n"
        "def missing(): raise FileNotFoundError('grid file not found: g.yaml')\n"
        "def unpack(): a, b = [1]\n"
        "def opens(): open('/nonexistent/zotune-probe')\n",
        str(Path(cli.__file__).parent / "_probe.py"), "exec")
    ns: dict = {}
    exec(probe, ns)

    def raised(fn):
        try:
            fn()
        except Exception as e:
            return e
        raise AssertionError("did not raise")

    assert cli.user_error(raised(ns["on_purpose"])) and cli.user_error(raised(ns["missing"]))
    assert not cli.user_error(raised(ns["unpack"])) and not cli.user_error(raised(ns["opens"]))
    assert not cli.user_error(raised(lambda: (_ for _ in ()).throw(ValueError("outside zotune"))))


def test_eval_scores_with_the_template_scoring_as_training_does(recipe, monkeypatch, capsys):
    # zotune eval once ranked candidates by the summed log-likelihood whatever task.scoring said,
    # so a run with MeZO's template (per-token mean) was evaluated one way in training, another here
    import zotune.train.evaluate as ev  # zotune eval scores through evaluate_configured, as training does

    seen = {}

    def record(model, tokenizer, examples, metric, **kwargs):
        seen.update(kwargs)
        return {"accuracy": 0.5, "n": len(examples)}, [0.5] * len(examples)

    monkeypatch.setattr(ev, "evaluate_rows", record)
    assert cli.main(["eval", str(recipe), "task.template=mezo", "task.test=4", "task.dev=0", "task.train=4"]) == 0
    assert seen["scoring"] == "mean" and seen["max_length"] == 64
    assert cli.main(["eval", str(recipe), "task.scoring=sum", "task.test=4", "task.dev=0", "task.train=4"]) == 0
    assert seen["scoring"] == "sum"

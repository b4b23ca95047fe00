"""The command line: overrides anywhere on the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from zotune import cli


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: tiny-llama\ntask:\n  name: sst2\ntrain:\n  steps: 4\n")
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
    argv = [command, "optim.lr=1e-5", str(recipe), "train.steps=7", "optim.lr=2e-5"]
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

"""README's commands parse as written: flags exist, configs load, make targets exist."""

import pathlib
import re
import shlex

import pytest

from clipjax.bench import loss as bench_loss
from clipjax import inference_cli
from clipjax.data import cli as data_cli
from clipjax.main import eval_main, train_main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands(section: str) -> list[list[str]]:
    """Each command of the first bash block under ``## section``: continuations joined, comments and env dropped."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = body.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.match(r"[A-Z_]+=", words[0]):  # environment assignments before the command
            words.pop(0)
        if words:
            commands.append(words)
    return commands


def _check(argv, monkeypatch, capsys):
    prog, args = pathlib.Path(argv[0]).name, argv[1:]
    if prog in ("clipjax-train", "clipjax-eval"):
        monkeypatch.chdir(ROOT)  # config paths are relative to the checkout
        with pytest.raises(SystemExit) as exit_info:
            {"clipjax-train": train_main, "clipjax-eval": eval_main}[prog]([*args, "--print_config"])
        assert not exit_info.value.code, capsys.readouterr().err
    elif prog == "clipjax-data":
        data_cli._parser().parse_args(args)
    elif prog in ("clipjax-embed", "clipjax-predict"):
        {"clipjax-embed": inference_cli._embed_parser, "clipjax-predict": inference_cli._predict_parser}[prog]().parse_args(args)
    elif prog == "clipjax-bench":
        assert args[0] == "loss"
        bench_loss._parse(args[1:])
    elif prog == "make":
        makefile = (ROOT / "Makefile").read_text()
        assert all(f"\n{target}:" in makefile for target in args if "=" not in target), args
    else:
        raise AssertionError(f"README runs {prog}, which this test does not know")


@pytest.mark.parametrize("section", ["Quick start", "Use", "Train on your own images", "Use a trained model",
                                     "Running on CPU"])
def test_readme_commands_parse(section, monkeypatch, capsys):
    commands = _commands(section)
    assert commands
    for argv in commands:
        _check(argv, monkeypatch, capsys)

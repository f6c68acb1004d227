"""Command lines: every user mistake is one line naming the culprit and the fix; --help; --print_config."""

import os
import pathlib
import subprocess
import sys

import pytest

from clipjax import config as config_lib
from clipjax.errors import UserError, closest, run_cli
from clipjax.main import eval_main, train_main
from helpers import assert_one_line_error, run_in_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
CLIP = str(ROOT / "configs" / "clip.py")


def test_closest_names_by_spelling_and_initials():
    assert closest("learning_rate", ["lr", "b1", "warmup_steps"]) == ["lr"]
    assert closest("warmup_step", ["lr", "warmup_steps"]) == ["warmup_steps"]
    assert closest("zzz", ["lr", "warmup_steps"]) == []


def test_a_multi_line_error_prints_as_one_line(capsys):
    def main(argv):
        raise UserError("data.path '/x' holds no shards\n  make them with:\n\n  clipjax-data synth --out=/x\n")

    assert run_cli("clipjax-x", main, []) == 2
    assert capsys.readouterr().err == ("clipjax-x: error: data.path '/x' holds no shards; make them with:; "
                                       "clipjax-data synth --out=/x\n")


@pytest.mark.parametrize("argv, hints", [
    (["--config.optim.learning_rate=1"], ["--config.optim.learning_rate", "did you mean optim.lr?"]),
    (["--config.lr=1"], ["did you mean optim.lr?"]),
    (["--config.optim.lr=abc"], ["--config.optim.lr=abc", "type float"]),
    (["--config.train.steps=1.5"], ["--config.train.steps=1.5", "type int"]),
    (["--config.mesh.data=3"], ["XLA_FLAGS=--xla_force_host_platform_device_count=6"]),
    (["--config.evals.synthetic_zeroshot.classnames=/nonexistent/classes.txt"],
     ["classnames='/nonexistent/classes.txt'", "an existing file"]),
    (["--config.model.size=B/61"], ["model.size='B/61' is not one of", "did you mean B/16"]),
    (["--config.loss.impl=rings"], ["loss.impl='rings'", "did you mean ring?"]),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], ["at most one axis may be -1"]),
    (["--workdri=x"], ["'workdri'", "workdir"]),
    (["extra"], ["unexpected arguments: extra"]),
])
def test_train_mistakes_are_one_line(argv, hints, tmp_path, capsys):
    spec = f"--config={DEMO}:smoke,data={tmp_path / 'synthetic'}"
    code, _, err = run_in_process(train_main, [spec, f"--workdir={tmp_path / 'run'}", *argv], capsys)
    assert_one_line_error(code, err, "clipjax-train", *hints)
    assert not (tmp_path / "synthetic").exists()  # failed before any work


def test_config_file_mistakes_are_one_line(tmp_path, capsys):
    cases = [
        ([f"--config={CLIP}"], [f"{CLIP} needs data=DIR", f"--config={CLIP}:data=/path/to/shards"]),
        ([f"--config={CLIP}:model=B/16"], [f"--config={CLIP}:model=B/16,data=/path/to/shards"]),
        ([f"--config={CLIP}:data={tmp_path / 'none'}"], [f"data.path={tmp_path / 'none'}: no such folder"]),
        ([f"--config={DEMO}:smok"], ["config argument 'smok' is unknown; did you mean smoke?"]),
        ([f"--config={DEMO}:steps=many"], ["steps='many'", "type int"]),
        ([f"--config={ROOT / 'configs' / 'dmeo.py'}"], ["no such config file; did you mean demo.py?"]),
        ([], ["--config is required"]),
        ([f"--config={DEMO}"], ["--workdir is required"]),
    ]
    for argv, hints in cases:
        workdir = [f"--workdir={tmp_path / 'run'}"] if "--workdir is required" not in hints else []
        code, _, err = run_in_process(train_main, [*argv, *workdir], capsys)
        assert_one_line_error(code, err, "clipjax-train", *hints)


def test_unwritable_workdir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_in_process(
        train_main, [f"--config={DEMO}:smoke,data={tmp_path}", f"--workdir={blocker / 'run'}"], capsys)
    assert_one_line_error(code, err, "clipjax-train", f"workdir '{blocker / 'run'}' is not a writable directory")


def test_eval_shares_the_mistakes(tmp_path, capsys):
    code, _, err = run_in_process(
        eval_main, [f"--config={DEMO}:smoke", f"--workdir={tmp_path}", "--config.evals.synthetic_zeroshot.evry=1"],
        capsys)
    assert_one_line_error(code, err, "clipjax-eval", "did you mean evals.synthetic_zeroshot.every?")


def test_help_lists_flags_and_config_fields(capsys):
    code, out, _ = run_in_process(train_main, ["--help"], capsys)
    assert code == 0
    for flag in ("--config=FILE[:ARG]", "--config.a.b=VALUE", "--workdir=DIR", "--print_config", "--verbosity"):
        assert flag in out, flag
    assert set(config_lib.SECTIONS) == set(config_lib.base_config().keys())
    for name, about in config_lib.SECTIONS.items():
        assert f"  {name:<24}{about}" in out, name
    code, out, _ = run_in_process(train_main, [f"--config={DEMO}", "--help"], capsys)
    assert code == 0 and "smoke" in out  # the config file's own arguments


def test_print_config_shows_overrides_and_derived_values(tmp_path, capsys):
    code, out, _ = run_in_process(
        train_main, ["--config", f"{DEMO}:smoke,data={tmp_path}", "--config.optim.lr", "0.25", "--print_config"], capsys)
    assert code == 0
    assert "optim.lr = 0.25\n" in out
    assert "model.text.eot_id = 2\n" in out  # derived from data.tokenizer=bytes by validate()
    assert not os.listdir(tmp_path)


def test_plan_file_overrides_apply_and_the_command_line_wins(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text('{"overrides": ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.model.remat=full"]}')
    code, out, _ = run_in_process(train_main, [f"--config={DEMO}:smoke,data={tmp_path}", f"--plan={plan}",
                                               "--config.model.remat=none", "--print_config"], capsys)
    assert code == 0
    assert "mesh.data = 2\n" in out and "mesh.fsdp = 4\n" in out and "model.remat = 'none'\n" in out, out
    plan.write_text("not json")
    code, _, err = run_in_process(train_main, [f"--config={DEMO}:smoke", f"--plan={plan}", "--print_config"], capsys)
    assert_one_line_error(code, err, "clipjax-train", "--plan=", "clipjax-bench plan")


# ---------------------------------------------------------------- real processes


def _run(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_train_process_exits_2_with_one_line_and_traceback_only_with_verbosity(tmp_path):
    argv = ["-c", "from clipjax.main import train_main; train_main()", f"--config={DEMO}:smoke",
            f"--workdir={tmp_path}", "--config.optim.learning_rate=1"]
    proc = _run(argv)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("clipjax-train: error: --config.optim.learning_rate: no such config field; "
                                   "did you mean optim.lr?")
    proc = _run([*argv, "--verbosity=1"])  # positive control: the traceback is there when asked for
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr


@pytest.mark.parametrize("args, hints", [
    (["-m", "clipjax.data.cli", "convert", "csv", "--input=captions.csv", "--out=OUT"],
     ["clipjax-data: error: unrecognized argument '--input=captions.csv'"]),
    (["-m", "clipjax.data.cli", "convert", "csv", "--csv=missing.csv", "--out=OUT"],
     ["clipjax-data: error: missing.csv: no such file"]),
    (["-m", "clipjax.bench.cli", "los"], ["clipjax-bench: error: unknown suite 'los'; did you mean loss?"]),
    (["-m", "clipjax.bench.cli", "loss", "--batchsize=8"], ["clipjax-bench: error:", "did you mean --batch"]),
])
def test_data_and_bench_mistakes_are_one_line(args, hints, tmp_path):
    proc = _run([a.replace("OUT", str(tmp_path / "out")) for a in args], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for hint in hints:
        assert hint in lines[0], (hint, lines[0])

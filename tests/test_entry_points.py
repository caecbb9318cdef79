"""``python -m ddpm_curriculum.{train,generate,evaluate,prune}``, the console scripts in pyproject.toml, and
UserError being a ValueError."""

import importlib
import os
import signal
import subprocess
import sys

import pytest

from ddpm_curriculum.errors import UserError

from .helpers import ROOT

ENTRY_POINTS = {"train": "train_curriculum.py", "generate": "generate.py", "evaluate": "eval.py",
                "prune": "prune.py"}


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)
    with pytest.raises(ValueError, match="bad"):
        raise UserError("bad")


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_each_entry_module_runs_its_cli(name, capsys):
    run = importlib.import_module(f"ddpm_curriculum.{name}").run
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # train's run() installs the one-line stop handlers: keep them out of this process
        with pytest.raises(SystemExit) as exc:
            run(["--help"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_the_top_level_script_is_a_thin_wrapper(name):
    text = (ROOT / ENTRY_POINTS[name]).read_text()
    assert f"from ddpm_curriculum.{name} import run" in text and "raise SystemExit(run())" in text


def test_console_scripts_name_the_entry_modules():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"ddpm-{name}": f"ddpm_curriculum.{name}:run" for name in ENTRY_POINTS}


@pytest.mark.slow
def test_python_m_train_help_from_another_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    res = subprocess.run([sys.executable, "-m", "ddpm_curriculum.train", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "--config-path" in res.stdout and "--run-dir" in res.stdout

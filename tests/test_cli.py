import subprocess
import sys

from fseft.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("phantom", "datasets", "models", "predict", "evaluate", "pretrain"):
        assert name in out


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "fseft", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "fseft" in res.stdout

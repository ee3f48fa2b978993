import subprocess
import sys

import pytest

from fseft.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("phantom", "datasets", "models", "predict", "evaluate", "pretrain"):
        assert name in out


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "fseft", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "fseft" in res.stdout


@pytest.mark.parametrize("argv", [
    ["phantom", "--cases", "1", "--out", "{bad}"],
    ["predict", "-i", "scan.nii.gz", "--model", "phantom", "-o", "{bad}/mask.nii.gz"],
    ["evaluate", "--pred", "p", "--gt", "g", "--out", "{bad}/m.json"],
    ["adapt", "--model", "phantom", "--data", "d", "--structures", "liver", "--k", "1", "--out", "{bad}/run"],
    ["benchmark", "--config", "exp.yaml", "--out", "{bad}/bench"],
    ["demo", "--out", "{bad}/demo"],
    ["pretrain", "--config", "assembly.yaml", "--out", "{bad}/pretrain"],
])
def test_an_output_path_that_cannot_be_created_is_refused_before_any_work(tmp_path, capsys, argv):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = str(blocker / "sub")
    assert main([a.replace("{bad}", bad) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{bad}" in err and "is a file, not a folder" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]

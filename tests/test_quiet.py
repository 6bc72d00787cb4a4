"""quiet_output sends everything written to fd 1/2 (Python, C-level writes, child processes) to the log file,
while its console still reaches the real terminal; the descriptors are restored afterwards."""
from __future__ import annotations

import subprocess
import sys

from archipelago.quiet import log_path

SCRIPT = r"""
import os, subprocess, sys
from pathlib import Path
from archipelago.quiet import quiet_output
with quiet_output(Path(sys.argv[1])) as (console, term_err):
    print("python stdout noise")
    print("python stderr noise", file=sys.stderr)
    os.write(2, b"fd-level noise\n")
    subprocess.run([sys.executable, "-c", "print('child noise')"], check=True)
    console.print("the table")
    term_err.write("a warning for the user\n")
print("after: stdout")
print("after: stderr", file=sys.stderr)
"""


def test_noise_goes_to_the_file_and_the_console_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "train.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["the table", "after: stdout"]
    assert res.stderr.splitlines() == ["a warning for the user", "after: stderr"]
    assert set(log.read_text().splitlines()) == {"python stdout noise", "python stderr noise", "fd-level noise",
                                                 "child noise"}      # order: stdout is block-buffered


def test_log_path_lies_under_a_local_root(tmp_path):
    path = log_path(str(tmp_path / "run"), "train")
    assert path.parent == tmp_path / "run" / "logs" and path.name.startswith("train-")
    assert log_path("s3://bucket/run", "train").parent.name == "archipelago-logs"

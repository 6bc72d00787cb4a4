"""scripts/gallery.py (which regenerates docs/gallery.md; minutes of training, so not run here) imports and
parses its flags."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gallery.py"


def test_gallery_script_parses_its_flags(capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--ensemble" in capsys.readouterr().out

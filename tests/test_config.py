"""Config loading: defaults, YAML, dotted overrides, and one clear line for every kind of bad input."""
from __future__ import annotations

from pathlib import Path

import pytest

from archipelago.config import ArchipelagoConfig, dump_config, load_config
from archipelago.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "digits-quickstart.yaml"


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, ArchipelagoConfig), path


def test_defaults_work_without_file():
    cfg = load_config(None)
    assert cfg.expert.strategy == "single" and cfg.data.num_clusters >= 1


def test_dotted_overrides_are_typed():
    cfg = load_config(QUICKSTART, ["expert.depth=6", "expert.lr=1e-3", "data.partitioner=random",
                                   "tracking.enabled=false", "islands.per_island.1.strategy=ddp"])
    assert cfg.expert.depth == 6 and cfg.expert.lr == pytest.approx(1e-3)
    assert cfg.data.partitioner == "random" and cfg.tracking.enabled is False
    assert cfg.islands.per_island[1].strategy == "ddp"


def test_config_hash_changes_with_content_only():
    a, b = load_config(QUICKSTART), load_config(QUICKSTART)
    assert a.config_hash() == b.config_hash()
    assert load_config(QUICKSTART, ["expert.depth=6"]).config_hash() != a.config_hash()
    # dump -> load round trip preserves the hash
    assert ArchipelagoConfig.model_validate(__import__("yaml").safe_load(dump_config(a))).config_hash() == \
        a.config_hash()


BAD = [
    # (yaml text, overrides, substrings the single error line must contain)
    ("expert:\n  strategy: horovod\n", [], ["expert.strategy", "single | ddp | fsdp2 | deepspeed", "horovod"]),
    ("expert:\n  depht: 6\n", [], ["unknown field 'expert.depht'", "depth"]),
    ("expert:\n  steps: -5\n", [], ["expert.steps", "greater than or equal to 1"]),
    ("expert:\n  lr: fast\n", [], ["expert.lr", "valid number"]),
    ("data:\n  num_clusters: 0\n", [], ["data.num_clusters"]),
    ("islands:\n  num_workers: 0\n", [], ["islands.num_workers"]),
    ("expert:\n  hidden_size: 30\n  num_heads: 4\n", [], ["num_heads=4 must divide hidden_size=30"]),
    ("expert: [1, 2\n", [], ["not valid YAML"]),
    ("- just\n- a list\n", [], ["top level must be a mapping"]),
    ("bogus_section: {}\n", [], ["unknown field 'bogus_section'"]),
    ("", ["expert.nope=1"], ["unknown field 'expert.nope'"]),
    ("", ["expert.depth"], ["expected KEY=VALUE"]),
    ("inference:\n  routing: top-x\n", [], ["inference.routing"]),
]


@pytest.mark.parametrize("text,overrides,needles", BAD)
def test_bad_config_gives_one_clear_line(tmp_path, text, overrides, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(path) in msg or "--set" in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.e2e
def test_cli_bad_config_is_one_line_without_traceback(tmp_path, cli):
    path = tmp_path / "bad.yaml"
    path.write_text("expert:\n  strategy: horovod\n")
    res = cli("data", "prepare", "--config", str(path), "--out", str(tmp_path / "data"))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "expert.strategy" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()
    # --debug shows the traceback
    res = cli("--debug", "data", "prepare", "--config", str(path), "--out", str(tmp_path / "data"))
    assert res.returncode != 0 and "Traceback" in res.stderr

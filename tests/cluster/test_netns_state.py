"""The namespace cluster's state file outside cli.py: where it lives, and teardown when nothing is recorded
(no root needed)."""
from __future__ import annotations

from pathlib import Path

from archipelago.cluster import netns_state


def test_state_path_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ARCHIPELAGO_NETNS_STATE", raising=False)
    assert netns_state.state_path() == Path("~/.archipelago/netns-cluster.json").expanduser()
    monkeypatch.setenv("ARCHIPELAGO_NETNS_STATE", str(tmp_path / "env.json"))
    assert netns_state.state_path() == tmp_path / "env.json"
    assert netns_state.state_path(tmp_path / "given.json") == tmp_path / "given.json"


def test_down_without_a_recorded_cluster_stops_nothing(tmp_path):
    line = netns_state.local_down(tmp_path / "none.json")
    assert line.startswith("no namespace cluster recorded in") and "nothing stopped" in line

"""The versioned unit description a primary sends and a backup builds from."""

from __future__ import annotations

from pathlib import Path

import pytest

from remus.container import Container, DescribedContainer
from remus.errors import ConfigError
from remus.unit import UnitSpec
from remus.unit_desc import VERSION, UnitDescription, state_dirs_of

DESC = {"host_if": "veth-kv", "ipv4": ["10.77.0.100/24"], "links": []}


def test_run_description_round_trips_and_keeps_the_flat_layout() -> None:
    spec = UnitSpec.for_run("kv", "10.77.0.100/24", "eth0")
    d = UnitDescription.for_run(spec, [Path("/srv/kv")])
    doc = d.to_json()
    assert doc["version"] == VERSION and doc["mode"] == "run" and doc["vip"] == "10.77.0.100/24"
    back = UnitDescription.from_json(doc | {"on_peer_loss": "stall", "instance": "x"})
    assert back == d and back.state_dirs == ("/srv/kv",)
    assert isinstance(back.container(), Container) and back.netns == spec.netns
    assert back.where() == "10.77.0.100/24 on eth0"
    # what agents before the description wrote: no version, no mode
    old = spec.to_json() | {"state_dirs": []}
    assert UnitDescription.from_json(old).run == spec


def test_protect_description_round_trips() -> None:
    d = UnitDescription.for_protect("web", "veth-kv", DESC, [])
    back = UnitDescription.from_json(d.to_json())
    assert back == d and back.netns == "remus-web" and back.where() == "10.77.0.100/24"
    assert isinstance(back.container(), DescribedContainer)


@pytest.mark.parametrize("doc, says", [
    ({"version": VERSION + 1, "name": "kv"}, "version"),
    ({"version": "1", "name": "kv"}, "version"),
    ({"name": "kv", "mode": "vm"}, "unknown mode"),
    ({"mode": "run"}, "no unit name"),
    ({"name": "kv", "mode": "protect", "netdesc": DESC}, "host_if and netdesc"),
    ({"name": "kv", "vip": "10.0.0.1/32"}, "unit description of 'kv'"),
    ({"name": "kv", "state_dirs": "/srv"}, "state_dirs"),
])
def test_descriptions_this_agent_cannot_use_are_refused(doc: dict, says: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=says):
        UnitDescription.from_json(doc)


def test_state_dirs_are_checked() -> None:
    assert state_dirs_of({"state_dirs": ["/srv/a/", "/srv/b"]}) == ["/srv/a", "/srv/b"]
    assert state_dirs_of({}) == []
    with pytest.raises(ConfigError):
        state_dirs_of({"state_dirs": [1]})

"""The unit description: what a backup must build to restore the unit.

The primary sends it in every HELLO (the `spec`), the backup keeps it in its
unit.json and builds the standby container and the takeover from it. JSON,
versioned; one of two kinds (`mode`):

  run      `remus run` built the container: the UnitSpec fields (name, vip,
           dev, MACs, gateway, unit_if) at the top level
  protect  `remus protect` found it: `host_if` and `netdesc`, the described
           network (remus.netdesc_read) that the backup rebuilds identically

Both carry `name`, `version` and `state_dirs`. A description without
`version` is version 1 (agents before this module wrote none). Keys it does
not know (the session adds `on_peer_loss` and `instance`) are ignored here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remus.container import Container, DescribedContainer, UnitContainer
from remus.errors import ConfigError
from remus.netdesc_read import Desc
from remus.unit import UnitSpec

VERSION = 1
MODES = ("run", "protect")


def state_dirs_of(doc: dict[str, Any]) -> list[str]:
    """The state directories a description names (checked: a list of paths)."""
    dirs = doc.get("state_dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(x, str) for x in dirs):
        raise ConfigError(f"unit description: state_dirs must be a list of paths, not {dirs!r}")
    return [str(Path(x)) for x in dirs]


@dataclass(frozen=True)
class UnitDescription:
    name: str
    mode: str
    state_dirs: tuple[str, ...] = ()
    run: UnitSpec | None = None  # mode "run"
    host_if: str | None = None  # mode "protect"
    netdesc: Desc | None = None  # mode "protect"

    @classmethod
    def for_run(cls, spec: UnitSpec, state_dirs: list[Path]) -> UnitDescription:
        return cls(spec.name, "run", tuple(str(x) for x in state_dirs), run=spec)

    @classmethod
    def for_protect(cls, name: str, host_if: str, desc: Desc,
                    state_dirs: list[Path]) -> UnitDescription:
        return cls(name, "protect", tuple(str(x) for x in state_dirs), host_if=host_if,
                   netdesc=desc)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": VERSION, "name": self.name, "mode": self.mode,
                               "state_dirs": list(self.state_dirs)}
        if self.run is not None:
            doc |= self.run.to_json()
        else:
            doc |= {"host_if": self.host_if, "netdesc": self.netdesc}
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> UnitDescription:
        """ConfigError for a description this agent cannot use (it came from the
        network, or from unit.json written by another version)."""
        version = doc.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= VERSION:
            raise ConfigError(f"unit description version {version!r}: this agent reads "
                              f"versions 1 to {VERSION} (upgrade it)")
        mode, name = doc.get("mode", "run"), doc.get("name")
        if mode not in MODES:
            raise ConfigError(f"unit description: unknown mode {mode!r}")
        if not isinstance(name, str) or not name:
            raise ConfigError("unit description: no unit name")
        dirs = tuple(state_dirs_of(doc))
        if mode == "protect":
            desc, host_if = doc.get("netdesc"), doc.get("host_if")
            if not isinstance(desc, dict) or not isinstance(host_if, str):
                raise ConfigError("unit description: a protected unit needs host_if and netdesc")
            return cls(name, mode, dirs, host_if=host_if, netdesc=desc)
        try:
            spec = UnitSpec.from_json(doc)
        except TypeError as e:
            raise ConfigError(f"unit description of {name!r}: {e}") from e
        return cls(name, mode, dirs, run=spec)

    @property
    def netns(self) -> str:
        return self.run.netns if self.run is not None else f"remus-{self.name}"

    def container(self, dev: str | None = None) -> UnitContainer:
        """The unit's container on this host (not built yet, or the standby)."""
        if self.run is not None:
            return Container(self.run)
        assert self.netdesc is not None
        return DescribedContainer(self.netdesc, self.netns, dev)

    def where(self) -> str:
        """Where the service lives, for log lines."""
        if self.run is not None:
            return f"{self.run.vip} on {self.run.dev}"
        return ", ".join((self.netdesc or {}).get("ipv4", []))

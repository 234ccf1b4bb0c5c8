"""A fleet's state in ZooKeeper, next to the units' records (remus.coordinator).

Layout under the coordinator URL's PATH:

    hosts/ADDR          ephemeral: a live agent (its free memory, pid)
    services/NAME       what `remus ctl add` asked for (ServiceSpec)
    units/NAME          who runs the unit: the pair's CAS (remus.coordinator)
    placement/NAME      where the leader wants the primary and the backup
    status/NAME/ADDR    ephemeral: what the agent on ADDR reports of the unit
    requests/NAME       a switchover or failover asked for by `remus ctl`
    leader              the election of the agent that places services
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from remus.coordinator import CoordinatorUnavailable, UnitRecord, ZkCoordinator
from remus.errors import ConfigError
from remus.placement import Host, Placement

FIRST_PORT = 7800  # backups of fleet services listen on FIRST_PORT, FIRST_PORT + 1, ...


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    vip: str
    cmd: list[str]
    port: int
    interval_ms: float = 50.0
    state_dirs: list[str] = field(default_factory=list)
    dev: str = "eth0"
    prefer: str | None = None  # the host to start on (`remus ctl add --on`)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ServiceSpec:
        d = json.loads(raw)
        return cls(name=d["name"], vip=d["vip"], cmd=list(d["cmd"]), port=int(d["port"]),
                   interval_ms=float(d.get("interval_ms", 50.0)),
                   state_dirs=list(d.get("state_dirs", [])), dev=d.get("dev", "eth0"),
                   prefer=d.get("prefer"))


class FleetStore:
    """Reads and writes of the fleet's nodes; CoordinatorUnavailable when ZooKeeper
    does not answer (the caller retries on its next cycle)."""

    def __init__(self, coord: ZkCoordinator) -> None:
        self.coord = coord
        self.path = coord.path

    @property
    def zk(self) -> Any:
        return self.coord._client()

    def _get(self, path: str) -> tuple[bytes | None, int]:
        from kazoo.exceptions import NoNodeError

        def get() -> tuple[bytes | None, int]:
            try:
                raw, stat = self.zk.get(path)
            except NoNodeError:
                return None, -1
            return raw, int(stat.version)

        result: tuple[bytes | None, int] = self.coord._call(get)
        return result

    def _read_all(self, folder: str) -> dict[str, bytes]:
        """name -> data of every node under PATH/folder (gone meanwhile: left out)."""
        out = {}
        for name in self._children(f"{self.path}/{folder}"):
            raw, _ = self._get(f"{self.path}/{folder}/{name}")
            if raw is not None:
                out[name] = raw
        return out

    def _put(self, node: str, raw: bytes, ephemeral: bool = False) -> None:
        """Create `node` with `raw`, or overwrite it if it exists."""
        from kazoo.exceptions import NodeExistsError

        def put() -> None:
            try:
                self.zk.create(node, raw, ephemeral=ephemeral, makepath=True)
            except NodeExistsError:
                self.zk.set(node, raw)

        self.coord._call(put)

    def _children(self, path: str) -> list[str]:
        from kazoo.exceptions import NoNodeError

        def ls() -> list[str]:
            try:
                return sorted(self.zk.get_children(path))
            except NoNodeError:
                return []

        result: list[str] = self.coord._call(ls)
        return result

    # -- hosts ------------------------------------------------------------------------
    def register_host(self, addr: str, info: dict[str, Any]) -> None:
        self._put(f"{self.path}/hosts/{addr}", json.dumps(info).encode(), ephemeral=True)

    def hosts(self) -> dict[str, Host]:
        return {addr: Host(addr, int(json.loads(raw).get("mem_available", 0)))
                for addr, raw in self._read_all("hosts").items()}

    # -- services -----------------------------------------------------------------------
    def add_service(self, spec: ServiceSpec) -> None:
        from kazoo.exceptions import NodeExistsError

        def make() -> None:
            try:
                self.zk.create(f"{self.path}/services/{spec.name}", spec.to_json(),
                               makepath=True)
            except NodeExistsError as e:
                raise ConfigError(f"service {spec.name} exists already") from e

        self.coord._call(make)

    def restore_service(self, spec: ServiceSpec) -> bool:
        """Write a service back after the coordinator lost its data (True if it did).

        Only when the services folder itself is gone: a single missing service
        was removed by `remus ctl remove`, which must not be undone."""

        def put() -> bool:
            if self.zk.exists(f"{self.path}/services") is not None:
                return False
            self.zk.create(f"{self.path}/services/{spec.name}", spec.to_json(), makepath=True)
            return True

        from kazoo.exceptions import NodeExistsError

        try:
            return bool(self.coord._call(put))
        except NodeExistsError:
            return False

    def remove_service(self, name: str) -> None:
        from kazoo.exceptions import NoNodeError

        def rm() -> None:
            for sub in ("services", "placement", "requests"):
                try:
                    self.zk.delete(f"{self.path}/{sub}/{name}", recursive=True)
                except NoNodeError:
                    pass

        self.coord._call(rm)

    def services(self) -> dict[str, ServiceSpec]:
        return {name: ServiceSpec.from_json(raw) for name, raw in self._read_all("services").items()}

    def next_port(self) -> int:
        used = {s.port for s in self.services().values()}
        port = FIRST_PORT
        while port in used:
            port += 1
        return port

    # -- units and placements ------------------------------------------------------------
    def records(self, names: list[str]) -> dict[str, UnitRecord]:
        out = {}
        for n in names:
            rec, _ = self.coord.read(n)
            if rec is not None:
                out[n] = rec
        return out

    def placements(self) -> dict[str, Placement]:
        return {name: _placement(raw) for name, raw in self._read_all("placement").items()}

    def placement(self, name: str) -> Placement | None:
        raw, _ = self._get(f"{self.path}/placement/{name}")
        return None if raw is None else _placement(raw)

    def set_placement(self, name: str, p: Placement) -> None:
        self._put(f"{self.path}/placement/{name}", json.dumps(asdict(p)).encode())

    # -- status and requests --------------------------------------------------------------
    def publish_status(self, name: str, addr: str, doc: dict[str, Any]) -> None:
        self._put(f"{self.path}/status/{name}/{addr}", json.dumps(doc).encode(), ephemeral=True)

    def statuses(self, name: str) -> dict[str, dict[str, Any]]:
        return {addr: json.loads(raw) for addr, raw in self._read_all(f"status/{name}").items()}

    def request(self, name: str, op: str, to: str | None = None) -> None:
        node = f"{self.path}/requests/{name}"
        raw = json.dumps({"op": op, "to": to}).encode()

        def put() -> None:
            self.zk.create(node, raw, makepath=True)

        from kazoo.exceptions import NodeExistsError

        try:
            self.coord._call(put)
        except NodeExistsError as e:
            raise ConfigError(f"a request for {name} is pending already") from e

    def requests(self) -> dict[str, dict[str, Any]]:
        """Every pending request, by service (left in place)."""
        return {name: json.loads(raw) for name, raw in self._read_all("requests").items()}

    def peek_request(self, name: str) -> dict[str, Any] | None:
        raw, _ = self._get(f"{self.path}/requests/{name}")
        return None if raw is None else dict(json.loads(raw))

    def take_request(self, name: str) -> dict[str, Any] | None:
        """The pending request for `name`, removed (whoever deletes it carries it out)."""
        from kazoo.exceptions import BadVersionError, NoNodeError

        raw, version = self._get(f"{self.path}/requests/{name}")
        if raw is None:
            return None

        def rm() -> bool:
            try:
                self.zk.delete(f"{self.path}/requests/{name}", version=version)
            except (NoNodeError, BadVersionError):
                return False
            return True

        req: dict[str, Any] = json.loads(raw)
        return req if self.coord._call(rm) else None


def _placement(raw: bytes) -> Placement:
    d = json.loads(raw)
    return Placement(d["primary"], d.get("backup"))


__all__ = ["CoordinatorUnavailable", "FleetStore", "ServiceSpec"]

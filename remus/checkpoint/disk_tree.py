"""DiskTracker's view of a tracked tree (Node, as of the last capture) and inotify events replayed on it."""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from remus.checkpoint.disk_wire import STASH, attrs_of, kind_of
from remus.checkpoint.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
)

_STRUCTURE = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_CONTENT = IN_MODIFY | IN_CLOSE_WRITE


class Node:
    """One entry of a tracked tree as of the last capture (the backup holds it at ``old``)."""

    __slots__ = ("ino", "kind", "attrs", "size", "target", "hashes", "parent", "name",
                 "children", "old", "wd")

    def __init__(self, st: os.stat_result, kind: str, parent: Node | None, name: str) -> None:
        self.ino = st.st_ino
        self.kind = kind
        self.attrs = attrs_of(st)
        self.size = st.st_size if kind == "f" else 0
        self.target: str | None = None
        self.hashes = array("Q")
        self.parent = parent
        self.name = name
        self.children: dict[str, Node] = {}
        self.old: str | None = None  # None: created in the epoch being captured
        self.wd = -1

    def path(self) -> str:
        parts = []
        n: Node | None = self
        while n is not None and n.parent is not None:
            parts.append(n.name)
            n = n.parent
        return "/".join(reversed(parts))

    def walk(self) -> Iterator[Node]:
        yield self
        for c in list(self.children.values()):
            yield from c.walk()

    def find(self, rel: str) -> Node | None:
        """The node at ``rel`` (a path relative to this one), if the tree has it."""
        n: Node | None = self
        for part in rel.split("/"):
            n = n.children.get(part) if n is not None else None
        return n


def entries(path: Path, is_top: bool) -> dict[str, os.stat_result]:
    """A directory's entries the tracker follows (not the stash, nor sockets and devices)."""
    out = {}
    with os.scandir(path) as it:
        for e in it:
            if is_top and e.name == STASH:
                continue
            st = e.stat(follow_symlinks=False)
            if kind_of(st.st_mode) is not None:
                out[e.name] = st
    return out


def attached(node: Node, top: Node) -> bool:
    n = node
    while n.parent is not None:
        n = n.parent
    return n is top


@dataclass
class Events:
    """What one drain of the inotify queue said, per root index."""

    dirty: dict[int, set[Node]] = field(default_factory=dict)  # dirs whose entries changed
    content: dict[int, set[Node]] = field(default_factory=dict)
    meta: dict[int, set[Node]] = field(default_factory=dict)
    moved: list[Node] = field(default_factory=list)
    detached: list[Node] = field(default_factory=list)
    pending: dict[int, tuple[int, Node]] = field(default_factory=dict)  # MOVED_FROM by cookie
    rescan: set[int] = field(default_factory=set)

    def add(self, which: dict[int, set[Node]], i: int, node: Node) -> None:
        which.setdefault(i, set()).add(node)

    def detach(self, node: Node) -> None:
        if node.parent is not None:
            node.parent.children.pop(node.name, None)
        node.parent = None
        self.detached.append(node)

    def old_index(self, top: Node) -> dict[str, Node]:
        """Every node the backup holds, by its path there (valid mid-capture)."""
        out: dict[str, Node] = {}
        for start in [top, *self.detached, *(n for _, n in self.pending.values())]:
            for n in start.walk():
                if n.old is not None:
                    out[n.old] = n
        return out

    def replay(self, i: int, top: Node | None, d: Node, mask: int, cookie: int, name: str) -> None:
        """One event about directory ``d`` of root ``i`` (whose top node is ``top``)."""
        if not name:  # about the watched directory itself
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and d is top:
                self.rescan.add(i)
            elif mask & IN_ATTRIB:
                self.add(self.meta, i, d)
            return
        if mask & _STRUCTURE:
            self.add(self.dirty, i, d)
        child = d.children.get(name)
        if mask & IN_MOVED_FROM:
            if child is not None:
                d.children.pop(name)
                child.parent = None
                self.pending[cookie] = (i, child)
        elif mask & IN_MOVED_TO:
            if child is not None:
                self.detach(child)  # replaced by the rename
            got = self.pending.pop(cookie, None)
            if got is not None and got[0] == i:
                node = got[1]
                d.children[name] = node
                node.parent, node.name = d, name
                self.moved.append(node)
            elif got is not None:  # across roots: a delete there, a create here
                self.detached.append(got[1])
        elif mask & (IN_CREATE | IN_DELETE):
            if child is not None:
                self.detach(child)
        elif child is not None and mask & _CONTENT:
            self.add(self.content, i, child)
        elif child is not None and mask & IN_ATTRIB:
            self.add(self.meta, i, child)

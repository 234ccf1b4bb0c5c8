"""The iptables (and ip6tables) rules that send a veth's traffic to two netfilter
queues: one chain REMUS-<veth>, installed and removed in one iptables-restore
transaction per family. remus.netbuf.nfqueue binds the queues and holds the
packets.
"""

from __future__ import annotations

import logging

from remus.proc import Runner, run_cmd

log = logging.getLogger(__name__)

NDP_TYPES = ("router-solicitation", "router-advertisement", "neighbour-solicitation",
             "neighbour-advertisement")


def chain_name(veth: str) -> str:
    return f"REMUS-{veth}"  # <= 21 chars: iptables allows 28


class QueueRules:
    """The iptables (and ip6tables) rules that feed our two queues.

    Everything lives in one chain REMUS-<veth>, reached by jumps from FORWARD
    (the unit's routed traffic; bridged=True matches the veth as a bridge port
    with -m physdev, which needs bridge-nf-call-iptables=1 in that namespace)
    and, with local=True, from INPUT/OUTPUT (traffic between the unit and the
    host itself, which may pass it on).
    install() is one iptables-restore transaction per family, so the unit's
    traffic is never half covered. There is no --queue-bypass: without a
    listener the kernel drops."""

    def __init__(self, veth: str, *, netns: str | None = None, local: bool = True,
                 bridged: bool = False, runner: Runner = run_cmd) -> None:
        self.veth = veth
        self.bridged = bridged
        self.chain = chain_name(veth)
        self.netns = netns
        self.local = local
        self.run = runner
        self._families: list[str] | None = None

    def families(self) -> list[str]:
        if self._families is None:
            fams = ["iptables"]
            v6 = self.run(["ip6tables", "-w", "-S", "FORWARD"], netns=self.netns, check=False)
            if v6.returncode == 0:
                fams.append("ip6tables")
            else:
                log.warning("ip6tables unusable (%s): IPv6 output of %s is not buffered",
                            v6.stderr.strip(), self.veth)
            self._families = fams
        return self._families

    def script(self, q_out: int, q_in: int, family: str = "iptables") -> str:
        v, c = self.veth, self.chain
        if self.bridged:
            # The veth is a bridge port: -i/-o would name the bridge.
            m_in, m_out = f"-m physdev --physdev-in {v}", f"-m physdev --physdev-out {v}"
        else:
            m_in, m_out = f"-i {v}", f"-o {v}"
        lines = ["*filter", f":{c} - [0:0]"]
        if family == "ip6tables":
            # Neighbour discovery is IPv6's ARP (which iptables never sees):
            # link plumbing, not unit output. Holding it would only delay.
            lines += [f"-A {c} -p ipv6-icmp --icmpv6-type {t} -j RETURN" for t in NDP_TYPES]
        lines += [f"-A {c} {m_in} -j NFQUEUE --queue-num {q_out}",
                  f"-A {c} {m_out} -j NFQUEUE --queue-num {q_in}",
                  f"-I FORWARD 1 {m_in} -j {c}", f"-I FORWARD 1 {m_out} -j {c}"]
        if self.local:
            lines.append(f"-I INPUT 1 {m_in} -j {c}")
            if not self.bridged:  # physdev-out cannot match locally generated packets
                lines.append(f"-I OUTPUT 1 {m_out} -j {c}")
        return "\n".join([*lines, "COMMIT", ""])

    def install(self, q_out: int, q_in: int) -> None:
        for fam in self.families():
            try:
                self.run([f"{fam}-restore", "-w", "--noflush"], netns=self.netns,
                         stdin=self.script(q_out, q_in, fam))
            except Exception:
                self.remove()
                raise

    def removal_script(self, saved: str) -> str | None:
        """From `iptables-save -t filter` output: delete our jumps, then the chain."""
        if f":{self.chain} " not in saved:
            return None
        jumps = [line.replace("-A ", "-D ", 1) for line in saved.splitlines()
                 if line.startswith("-A ") and line.endswith(f"-j {self.chain}")]
        return "\n".join(["*filter", *jumps, f"-F {self.chain}", f"-X {self.chain}",
                          "COMMIT", ""])

    def remove(self) -> None:
        """Delete our jumps and chain if present (also a dead agent's leftovers)."""
        for fam in self.families():
            saved = self.run([f"{fam}-save", "-t", "filter"], netns=self.netns, check=False)
            script = self.removal_script(saved.stdout)
            if script is not None:
                self.run([f"{fam}-restore", "-w", "--noflush"], netns=self.netns, stdin=script)

    def present(self) -> bool:
        return any(f":{self.chain} " in self.run([f"{fam}-save", "-t", "filter"],
                                                 netns=self.netns, check=False).stdout
                   for fam in self.families())

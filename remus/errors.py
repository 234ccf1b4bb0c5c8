"""Exception hierarchy: one root, one fatal subclass.

Agents' loops log any RemusError and keep going; FatalError ends the agent.
The CLI turns every RemusError into a one-line message and a non-zero exit.
"""


class RemusError(Exception):
    """Root of every error remus raises on purpose."""


class FatalError(RemusError):
    """The agent cannot continue (e.g. the unit is gone, CRIU is missing)."""


class ConfigError(RemusError):
    """Bad input from the user: options, pid, paths, timing relations."""


class HostError(RemusError):
    """The host lacks something remus needs (kernel feature, binary, root)."""


class CheckpointError(RemusError):
    """A CRIU dump or restore failed; the message carries CRIU's reason."""


class ProtocolError(RemusError):
    """Base of replication protocol errors (see remus.protocol)."""

"""vela-bridge: the sidecar that carries a host's changes to the other hosts.

One bridge runs per host next to the workers. It tails the change log that
workers of a replicated cache write into the segment, sends the changes to
the bridges of the other hosts over ZeroMQ, applies theirs to the host's
table (last writer wins), keeps membership with heartbeats, resyncs a member
from a snapshot when it missed anything, and publishes the cluster view into
the segment. See ``vela-bridge --help``.
"""

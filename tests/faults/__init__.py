"""Jepsen-style fault histories for Vela's multi-host topologies.

Simulated hosts (each its own network namespace, ``VELA_NAMESPACE``, bridge and
worker processes) run a recorded workload while a nemesis injects faults; after the
faults heal and the hosts had time to converge, a checker reads the history and the
hosts' final contents. Modules, one concern each:

- ``net``: the network: host namespaces on a Linux bridge, iptables faults inside them
- ``history``: the operation records (JSONL) and how they are read back
- ``client``: the workload process that runs on a simulated host and records its ops
- ``clock``: the clock offset of one host (libfaketime) and the check that it works
- ``wire``: capture of bridge traffic, replay and forgery
- ``nemesis``: the fault scenarios
- ``checker``: the anomalies a history and the final reads show
- ``runner``: one scenario on one topology, from setup to the table row
"""

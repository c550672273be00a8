"""The partition table of the partitioned topology.

Keys hash to a fixed number of partitions (``xxh3_64(encoded key) % PARTITIONS``,
the hash the table itself keeps for every entry); partitions map to members by
rendezvous hashing with bounded load: each partition ranks the members by
``xxh64(partition, member)`` and goes to the first one in its ranking that holds
fewer than ``ceil(PARTITIONS / members)`` partitions. Every bridge computes the
same table from the same member set, with no coordinator; a member that joins or
leaves moves about ``1 / members`` of the partitions, and the load stays within
one partition of even. The backup of a partition is the next member of its
ranking (bounded the same way), which is also the member that takes the
partition over when its owner dies in most cases: the backup copy is promoted
where it lies.
"""

import math

import xxhash

__all__ = ["PARTITIONS", "partition_of", "assign"]

PARTITIONS = 271  # a prime, as Hazelcast's default: keys spread evenly whatever their pattern


def partition_of(encoded_key, parts=PARTITIONS):
    """The partition of a key (its canonical encoding, ``vela._native.encode_key``)."""
    return xxhash.xxh3_64_intdigest(encoded_key) % parts


def _ranking(partition, members):
    return sorted(members, key=lambda m: (xxhash.xxh64_intdigest(f"{partition}:{m}".encode()), m),
                  reverse=True)


def assign(members, parts=PARTITIONS, backups=0):
    """``(owners, backups)``: the owner node of each partition and, with
    ``backups=1``, the node holding its backup copy (None with one member).

    :param members: node ids (ints) of the members in the ring.
    """
    members = sorted(set(members))
    if not members:
        raise ValueError("a partition table needs at least one member")
    cap = math.ceil(parts / len(members))
    load = dict.fromkeys(members, 0)
    backup_load = dict.fromkeys(members, 0)
    owners, backup_of = [], []
    for p in range(parts):
        ranking = _ranking(p, members)
        owner = next(m for m in ranking if load[m] < cap)
        load[owner] += 1
        owners.append(owner)
        backup = None
        if backups and len(members) > 1:
            others = [m for m in ranking if m != owner]
            backup = next((m for m in others if backup_load[m] < cap), others[0])
            backup_load[backup] += 1
        backup_of.append(backup)
    return owners, backup_of

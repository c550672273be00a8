"""The partition table of the partitioned topology.

Keys hash to a fixed number of partitions (``xxh3_64(encoded key) % PARTITIONS``,
the hash the table itself keeps for every entry); partitions map to members by
rendezvous hashing with bounded load: each partition ranks the members by
``xxh64(partition, member)`` and goes to the first one in its ranking that holds
fewer than ``ceil(PARTITIONS / members)`` partitions; members left below
``floor(PARTITIONS / members)`` then take the partitions that rank them highest.
Every bridge computes the same table from the same member set, with no
coordinator; a member that joins or leaves moves about ``1 / members`` of the
partitions, and every member owns the floor or the ceiling of an even share. The
backup of a partition is the next member of its ranking (bounded the same way),
which is in most cases also the member that takes the partition over when its
owner dies: the backup copy is promoted where it lies.
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
    cap, floor = math.ceil(parts / len(members)), parts // len(members)
    load = dict.fromkeys(members, 0)
    backup_load = dict.fromkeys(members, 0)
    rankings = [_ranking(p, members) for p in range(parts)]
    owners, backup_of = [], []
    for p in range(parts):
        owner = next(m for m in rankings[p] if load[m] < cap)
        load[owner] += 1
        owners.append(owner)
    # The cap bounds the most loaded; raise the least loaded to the floor, each time
    # with the partition that ranks it highest among those of members above the floor.
    for m in members:
        while load[m] < floor:
            p = min((p for p in range(parts) if load[owners[p]] > floor),
                    key=lambda p: (rankings[p].index(m), p))
            load[owners[p]] -= 1
            owners[p] = m
            load[m] += 1
    for p in range(parts):
        ranking = rankings[p]
        owner = owners[p]
        backup = None
        if backups and len(members) > 1:
            others = [m for m in ranking if m != owner]
            backup = next((m for m in others if backup_load[m] < cap), others[0])
            backup_load[backup] += 1
        backup_of.append(backup)
    return owners, backup_of

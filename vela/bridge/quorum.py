"""Whether this bridge may write partitions: it hears a majority of the cluster.

The two sides of a network split must not both accept writes, or the heal has to
drop the acknowledged writes of one of them (two counters that counted apart cannot
both win). So a partitioned bridge writes -- serves writes, lets its workers write
in place, takes a silent member's partitions over -- only while it hears a majority
of the cluster (the members of its last partition table and whoever speaks to it: a
member the majority took out of the table, or one that said goodbye, no longer
counts; on an even split the side holding the smallest node id goes on, so a cluster
of two survives the loss of its second member). It loses that right when its peers have been silent for half
the failure timeout (they turn "suspect"), before the majority declares it dead and
takes its partitions over at the full failure timeout: at no time do two members
write one partition. A member that wrote nothing for that long may find its
partitions written elsewhere when it hears the others again: it takes them back
through a handoff before it serves a read-modify-write on them again
(``Partitions.regained``).

Reads go on everywhere; on a minority they may be stale (the README says so).
``vela-bridge run --on-split continue`` lets every side write instead (available
writes, at the price of losing one side's writes to a key at the heal).
"""

import logging

log = logging.getLogger("vela.bridge")


def has_majority(me, heard, known):
    """True when ``heard`` (node ids heard lately, ``me`` included) is a majority of
    ``known`` (every member not gone, ``me`` included), or exactly half of it with its
    smallest node id."""
    heard, known = set(heard) | {me}, set(known) | {me}
    return 2 * len(heard) > len(known) or (2 * len(heard) == len(known) and min(known) in heard)


class Quorum:
    """The majority rule over time: whether writes are allowed now, and how long they
    were not (a spell long enough for the others to take partitions over)."""

    def __init__(self, failure_timeout, needed=True):
        self.failure_timeout = failure_timeout
        self.needed = needed  # False (--on-split continue): every side writes
        self.writable = True
        self.lost_at = None   # monotonic time the majority was lost, while it is

    def update(self, me, heard, known, now):
        """Take the members heard now; the length of the spell without a majority that
        just ended (None when nothing ended)."""
        writable = not self.needed or has_majority(me, heard, known)
        if writable == self.writable:
            return None
        self.writable = writable
        if not writable:
            self.lost_at = now
            log.warning("this bridge hears %d of the %d members: it serves no writes until it hears a "
                        "majority again (reads go on)", len(set(heard) | {me}), len(set(known) | {me}))
            return None
        spell, self.lost_at = now - self.lost_at, None
        log.info("this bridge hears a majority again (after %.1f s): writes resume", spell)
        return spell

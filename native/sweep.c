/*
 * sweep.c -- reclaiming expired entries in the background, by one process of
 * the host at a time.
 *
 * The sweep visits every stripe, at most `chunk` buckets per lock hold, so a
 * stripe is never held for long whatever its size. The sweeper is elected
 * through the header (admin lock): the first process to ask becomes it; it is
 * replaced when it dies (pid + start time no longer match a live process) or
 * stays silent longer than `stale_ns`.
 */
#include <unistd.h>

#include "vela.h"

/* Reclaim expired entries of buckets [from, from + n) of stripe s (locked). */
static uint64_t sweep_buckets(vela_table *t, uint32_t s, uint32_t from, uint32_t n, int64_t now,
                              vela_err *err)
{
    uint64_t reclaimed = 0;
    uint32_t *buckets = &t->buckets[(uint64_t)s * (t->bucket_mask + 1)];
    for (uint32_t i = from; i < from + n && i <= t->bucket_mask; i++) {
        uint32_t *link = &buckets[i];
        while (*link) {
            vela_entry *e = vela_entry_of(blk(t, *link));
            if (vela_is_expired(t, e, now)) {
                int tombstone = e->codec == VELA_CODEC_TOMBSTONE;
                vela_remove_entry(t, s, *link, 0, err);
                if (*err != VELA_OK)
                    return reclaimed;
                reclaimed += !tombstone; /* a forgotten delete is not an expired entry */
            } else {
                link = &e->next;
            }
        }
    }
    return reclaimed;
}

vela_err vela_sweep(vela_table *t, uint32_t chunk, uint64_t *reclaimed)
{
    *reclaimed = 0;
    if (chunk == 0)
        chunk = 64;
    int64_t now = vela_now(t);
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        for (uint32_t from = 0; from <= t->bucket_mask; from += chunk) {
            vela_err err = vela_stripe_lock(t, s);
            if (err != VELA_OK)
                return err;
            uint64_t n = t->stripes[s].entries ? sweep_buckets(t, s, from, chunk, now, &err) : 0;
            int empty = t->stripes[s].entries == 0;
            vela_stripe_unlock(t, s);
            *reclaimed += n;
            if (n && t->stats_enabled)
                vela_count(t, VELA_STAT_EXPIRATIONS, n);
            if (err != VELA_OK)
                return err;
            if (empty)
                break;
        }
    }
    return VELA_OK;
}

vela_err vela_sweeper_elect(vela_table *t, int64_t stale_ns, int *elected)
{
    vela_header *h = t->hdr;
    vela_err err = vela_admin_lock(t);
    if (err != VELA_OK)
        return err;
    int64_t now = vela_monotonic_ns();
    int mine = h->sweeper_pid == t->my_pid && h->sweeper_start == t->my_start;
    int vacant = h->sweeper_pid == 0 || !vela_proc_alive(h->sweeper_pid, h->sweeper_start) ||
                 now - h->sweeper_beat_ns > stale_ns || now < h->sweeper_beat_ns;
    if (mine || vacant) {
        h->sweeper_pid = t->my_pid;
        h->sweeper_start = t->my_start;
        h->sweeper_beat_ns = now;
    }
    *elected = mine || vacant;
    vela_admin_unlock(t);
    return VELA_OK;
}

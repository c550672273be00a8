/*
 * inspect.c -- looking at a live table without ever waiting for a lock, for
 * tools/inspect_shm.py and metrics: counters are read as they are (relaxed
 * loads), key samples try-lock each stripe and skip the busy ones, and say so.
 * It must work while every worker is frozen with a stripe locked.
 */
#include "vela.h"

void vela_stripe_snapshot(const vela_table *t, uint32_t s, vela_stripe_snapshot_t *out)
{
    const vela_stripe *st = &t->stripes[s];
    out->entries = __atomic_load_n(&st->entries, __ATOMIC_RELAXED);
    out->bytes = __atomic_load_n(&st->bytes, __ATOMIC_RELAXED);
    out->seq = __atomic_load_n(&st->seq, __ATOMIC_RELAXED);
    out->holder_pid = __atomic_load_n(&st->lock.holder_pid, __ATOMIC_RELAXED);
    out->recoveries = __atomic_load_n(&st->lock.recoveries, __ATOMIC_RELAXED);
}

int vela_lease_snapshot(const vela_table *t, uint32_t i, vela_lease *out)
{
    const vela_lease *l = &t->leases[i];
    out->hash = __atomic_load_n(&l->hash, __ATOMIC_ACQUIRE);
    if (!out->hash)
        return 0;
    out->holder_pid = l->holder_pid;
    out->holder_start = l->holder_start;
    out->since_ns = l->since_ns;
    out->outcome = l->outcome;
    return 1;
}

int vela_sample_stripe(vela_table *t, uint32_t s, uint32_t max, vela_sample_fn fn, void *ctx)
{
    if (vela_stripe_trylock_without_heap(t, s) != VELA_TRY_LOCKED)
        return -1; /* busy, or left by a dead owner: its repair needs the heap lock */
    int64_t now = vela_now(t);
    uint32_t n = 0;
    int failed = 0;
    uint32_t *buckets = &t->buckets[(uint64_t)s * (t->bucket_mask + 1)];
    for (uint32_t i = 0; i <= t->bucket_mask && n < max && !failed; i++)
        for (uint32_t ref = buckets[i]; ref && n < max && !failed;) {
            vela_entry *e = vela_entry_of(blk(t, ref));
            if (!vela_is_expired(t, e, now) && e->codec != VELA_CODEC_TOMBSTONE) {
                failed = fn(ctx, e, now) < 0;
                n++;
            }
            ref = e->next;
        }
    vela_stripe_unlock(t, s);
    return failed ? -2 : (int)n;
}

/*
 * replica.c -- what the bridge does to the table: apply changes that other
 * hosts made, and read the whole table for a snapshot.
 *
 * Applying is last-writer-wins by version: a put is stored only if it is newer
 * than the entry the table has, a delete removes only an older entry. So
 * changes may arrive late, twice or out of order (a snapshot racing the
 * stream) and every host still ends with the same contents. Applied changes
 * are not written to the change log (they are not this host's changes).
 * Tombstones of deletes, flushes and tag invalidations, which must also stop
 * older puts that arrive late, are kept by the bridge.
 */
#include "vela.h"

vela_err vela_apply_put(vela_table *t, const vela_put_args *a, int *applied)
{
    uint32_t s = vela_stripe_of(t, a->key->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    uint32_t ref = vela_find_any(t, s, a->key, &err); /* a tombstone's version counts too */
    *applied = err == VELA_OK && (!ref || vela_entry_of(blk(t, ref))->version < a->version);
    if (*applied)
        err = vela_do_put(t, s, a);
    vela_stripe_unlock(t, s);
    vela_observe_version(t, a->version);
    if (err != VELA_OK)
        *applied = 0;
    return err;
}

vela_err vela_apply_delete(vela_table *t, const vela_key *k, uint64_t version, int *removed)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    uint32_t ref = vela_find_any(t, s, k, &err);
    int newer = err == VELA_OK && (!ref || vela_entry_of(blk(t, ref))->version < version);
    *removed = newer && ref && vela_entry_of(blk(t, ref))->codec != VELA_CODEC_TOMBSTONE;
    if (newer)
        err = vela_do_tombstone(t, s, k, version); /* remembered, and carried by snapshots */
    vela_stripe_unlock(t, s);
    vela_observe_version(t, version);
    return err;
}

vela_err vela_scan(vela_table *t, uint64_t *cursor, uint32_t max, vela_scan_fn fn, void *ctx)
{
    uint32_t s = (uint32_t)(*cursor >> 32), b = (uint32_t)*cursor, n = 0;
    int64_t now = vela_now(t);
    while (s <= t->stripe_mask && n < max) {
        vela_err err = vela_stripe_lock(t, s);
        if (err != VELA_OK)
            return err;
        uint32_t *buckets = &t->buckets[(uint64_t)s * (t->bucket_mask + 1)];
        int failed = 0;
        for (; b <= t->bucket_mask && n < max && !failed; b++)
            for (uint32_t ref = buckets[b]; ref && !failed;) {
                vela_entry *e = vela_entry_of(blk(t, ref));
                if (!vela_is_expired(t, e, now)) {
                    failed = fn(ctx, e, now) < 0;
                    n++;
                }
                ref = e->next;
            }
        vela_stripe_unlock(t, s);
        if (failed)
            return VELA_ECALLER;
        if (b > t->bucket_mask) {
            s++;
            b = 0;
        }
    }
    *cursor = s > t->stripe_mask ? UINT64_MAX : ((uint64_t)s << 32 | b);
    return VELA_OK;
}

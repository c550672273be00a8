/*
 * near.c -- what the near cache needs from the table: fills that lose to
 * invalidations.
 *
 * A reader that misses L1 takes a reservation (the stripe's invalidation
 * sequence), reads L2, then fills L1 only if the sequence has not moved. An
 * invalidation that arrives while the L2 read is in flight bumps the
 * sequence, so the late fill -- which may carry the value from before the
 * change -- is dropped instead of living in L1 until its maximum age. The
 * sequence is per stripe: an invalidation of another key of the stripe also
 * voids the fill (a spurious miss later, never a stale hit).
 */
#include "vela.h"

vela_err vela_reserve(vela_table *t, const vela_key *k, uint32_t *token)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    *token = __atomic_load_n(&t->stripes[s].inval_seq, __ATOMIC_ACQUIRE);
    return VELA_OK;
}

vela_err vela_fill(vela_table *t, const vela_put_args *a, uint32_t token, int *stored)
{
    uint32_t s = vela_stripe_of(t, a->key->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    *stored = t->stripes[s].inval_seq == token;
    if (*stored)
        err = vela_do_put(t, s, a);
    vela_stripe_unlock(t, s);
    if (err != VELA_OK)
        *stored = 0;
    return err;
}

vela_err vela_invalidate(vela_table *t, const vela_key *k, int *removed)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    __atomic_add_fetch(&t->stripes[s].inval_seq, 1, __ATOMIC_RELEASE);
    uint32_t ref = vela_find(t, s, k, &err);
    *removed = ref != 0;
    if (ref)
        vela_remove_entry(t, s, ref, 0, &err);
    vela_stripe_unlock(t, s);
    return err;
}

void vela_invalidate_all_reservations(vela_table *t)
{
    for (uint32_t s = 0; s <= t->stripe_mask; s++)
        __atomic_add_fetch(&t->stripes[s].inval_seq, 1, __ATOMIC_RELEASE);
}

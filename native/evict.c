/*
 * evict.c -- making room: a clock hand over the heap, in address order.
 *
 * The hand visits blocks one after another. An entry whose access mark is set
 * gets a second chance (lru: the bit is cleared; lfu: the counter halves);
 * an unmarked or expired one is evicted. Because the hand moves in address
 * order, consecutive evictions free neighbouring blocks, which coalesce, so a
 * large put gets contiguous room instead of scattered holes.
 *
 * Bounds: after VISIT_BEFORE_FORCE blocks the marks are ignored (lru/lfu), and
 * the walk gives up (VELA_EFULL) after covering the heap three times, which
 * only happens when other processes hold the stripes in the way or the policy
 * is ttl_only. ttl_only evicts expired entries only.
 *
 * The spare blocks of an arena the hand passes over are given back to the
 * heap (every block of that arena), so arenas never hold memory eviction
 * needs.
 *
 * Runs with the caller's stripe s locked and the heap locked; every other
 * stripe is only try-locked (lock order in lock.c).
 */
#include "vela.h"

#define VISIT_BEFORE_FORCE 256
#define TTL_ONLY_VISITS 4096

/* Decide for the used entry block at `ref`: 1 = evict now. Ages the mark. */
static int victim(vela_table *t, vela_block *b, int force, int64_t now)
{
    vela_entry *e = vela_entry_of(b);
    if (vela_is_expired(t, e, now))
        return 1;
    switch (t->hdr->eviction) {
    case VELA_EVICT_TTL_ONLY:
        return 0;
    case VELA_EVICT_LFU:
        if (force || b->access == 0)
            return 1;
        b->access >>= 1;
        return 0;
    default:
        if (force || b->access == 0)
            return 1;
        b->access = 0;
        return 0;
    }
}

/* Walk the hand. With need > 0: stop at a free block of at least `need`
 * bytes and allocate it for stripe s. With need == 0: stop after one eviction.
 * Returns the allocated ref (need > 0), 1 (need == 0, evicted), or 0. */
static uint32_t walk(vela_table *t, uint32_t s, uint32_t need, int slot)
{
    vela_heap_state *h = &t->hdr->heap;
    uint32_t first = vela_heap_first(t), end = vela_heap_end(t);
    uint64_t heap_bytes = (uint64_t)(end - first) << 3, walked = 0;
    uint64_t visits = 0, max_visits = t->hdr->eviction == VELA_EVICT_TTL_ONLY ? TTL_ONLY_VISITS : UINT64_MAX;
    int64_t now = vela_now(t);
    if (h->hand < first || h->hand >= end)
        h->hand = first;

    while (walked < 3 * heap_bytes && visits < max_visits) {
        uint32_t ref = h->hand;
        vela_block *b = blk(t, ref);
        uint32_t size = vela_block_size(b);
        if (ref >= end || size < 8) {
            h->hand = first;
            continue;
        }
        if (!(b->size_flags & VELA_BLK_USED)) {
            if (need && size >= need) {
                uint32_t got = vela_heap_take(t, ref, need, s, slot);
                /* Move on: the new entry must not be the next victim. */
                h->hand = got + (vela_block_size(blk(t, got)) >> 3);
                return got;
            }
            h->hand = ref + (size >> 3);
            walked += size;
            continue;
        }
        uint32_t o = b->owner;
        int mine = o == s;
        if (b->kind == VELA_KIND_ARENA && o <= t->stripe_mask &&
            (mine || vela_stripe_trylock_holding_heap(t, o))) {
            /* Spare memory goes back before anything is evicted; the frees
             * keep the hand on a block (heap.c), looked at again next. */
            vela_arena_drain(t, o);
            if (!mine)
                vela_stripe_unlock(t, o);
            if (!(blk(t, h->hand)->size_flags & VELA_BLK_USED))
                continue;
        }
        visits++;
        walked += size;
        if (b->kind != VELA_KIND_ENTRY || o > t->stripe_mask || (!mine && !vela_stripe_trylock_holding_heap(t, o))) {
            h->hand = ref + (size >> 3);
            continue;
        }
        /* The trylock may have repaired stripe o: look at the block again. */
        if ((b->size_flags & VELA_BLK_USED) && b->kind == VELA_KIND_ENTRY &&
            victim(t, b, visits > VISIT_BEFORE_FORCE, now)) {
            int expired = vela_is_expired(t, vela_entry_of(b), now);
            vela_err err = VELA_OK;
            uint32_t freed = vela_remove_entry(t, o, ref, 1, &err);
            if (!mine)
                vela_stripe_unlock(t, o);
            if (!freed) {
                h->hand = ref + (size >> 3);
                continue;
            }
            VELA_COUNT(t, expired ? VELA_STAT_EXPIRATIONS : VELA_STAT_EVICTIONS);
            if (!need)
                return 1;
            h->hand = freed; /* look at the coalesced block next */
            continue;
        }
        if (!mine)
            vela_stripe_unlock(t, o);
        h->hand = ref + (size >> 3);
    }
    return 0;
}

uint32_t vela_evict_alloc(vela_table *t, uint32_t s, uint32_t size, int slot)
{
    uint32_t ref = walk(t, s, size, slot);
    if (!ref)
        vela_fail(VELA_EFULL, "no room for an entry of %u bytes: %s", size,
                  t->hdr->eviction == VELA_EVICT_TTL_ONLY
                      ? "eviction_policy=ttl_only and no expired entry was found"
                      : "every entry in reach is locked by other processes");
    return ref;
}

int vela_evict_one(vela_table *t, uint32_t s)
{
    return walk(t, s, 0, 0) != 0;
}

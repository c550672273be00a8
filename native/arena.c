/*
 * arena.c -- per-stripe allocation arenas: puts that do not take the heap lock.
 *
 * A stripe keeps a short chain of spare blocks it owns (kind VELA_KIND_ARENA,
 * owner = the stripe, linked through vela_entry.next). For the heap they are
 * used blocks, so the heap never touches them and only the stripe's lock
 * holder changes them, without the heap lock. A put takes a spare block that
 * fits from its own stripe's arena, and a replacing put gives the block it
 * replaces back to the arena: a stream of overwrites, or of inserts served by
 * refills, runs under the stripe lock alone and scales with processes.
 *
 * The heap lock is taken on a miss, once per put: it allocates the entry's
 * block and refills the arena with blocks of the same size (giving its oldest
 * spare blocks back to make room, so the arena follows the sizes written),
 * and frees the replaced block when the arena cannot keep it. Large blocks never enter
 * an arena (any entry up to max_entry_size still fits whatever its stripe).
 *
 * Memory held by arenas is never lost to the cache: each is bounded (a few
 * blocks, at most 1/16 of the heap over all stripes); the evictor's clock
 * hand gives back every arena it passes over (evict.c), and a put that could
 * evict nothing gives back every arena it can lock (vela_arena_reclaim) before
 * it is refused, so "no memory while memory is free" cannot happen.
 *
 * Crash safety: a block joins or leaves an arena while it is recorded in the
 * stripe's `pending` slots, and the chain's head changes by one store, so a
 * dead owner's stripe repair (repair.c) finds every spare block, in the chain
 * or pending, and gives all of them back to the heap.
 */
#include "vela.h"

#define ARENA_BLOCKS 8       /* spare blocks per stripe */
#define ARENA_REFILL 4       /* blocks a miss adds to its arena */
#define ARENA_MAX_BLOCK 1024 /* larger blocks go straight to and from the heap */

/* Bytes one stripe's arena may hold: at most 1/16 of the heap over all stripes. */
static uint64_t budget(const vela_table *t)
{
    uint64_t heap = t->hdr->heap_end - t->hdr->heap_off;
    uint64_t share = heap / 16 / ((uint64_t)t->stripe_mask + 1);
    return share < (uint64_t)ARENA_BLOCKS * ARENA_MAX_BLOCK ? share : (uint64_t)ARENA_BLOCKS * ARENA_MAX_BLOCK;
}

/* A spare block of `have` bytes serves an entry of `size` bytes: it is not
 * smaller, and wastes little. */
static int fits(uint32_t have, uint32_t size) { return have >= size && have - size < VELA_MIN_BLOCK + size / 8; }

uint32_t vela_arena_take(vela_table *t, uint32_t s, uint32_t size, int slot)
{
    vela_stripe *st = &t->stripes[s];
    uint32_t *link = &st->arena;
    for (uint32_t ref = *link; ref; ref = *link) {
        vela_block *b = blk(t, ref);
        uint32_t have = vela_block_size(b);
        if (fits(have, size)) {
            st->pending[slot] = ref; /* repair's record from here on */
            __atomic_store_n(link, vela_entry_of(b)->next, __ATOMIC_RELAXED);
            vela_debug_stall(6);
            b->kind = VELA_KIND_ENTRY;
            st->arena_blocks--;
            st->arena_bytes -= have;
            return ref;
        }
        link = &vela_entry_of(b)->next;
    }
    return 0;
}

/* Room for one more block and `bytes` more bytes. */
static int has_room(const vela_table *t, uint32_t s, uint64_t bytes)
{
    const vela_stripe *st = &t->stripes[s];
    return st->arena_blocks < ARENA_BLOCKS && st->arena_bytes + bytes <= budget(t);
}

int vela_arena_would_keep(const vela_table *t, uint32_t s, uint32_t size)
{
    return size <= ARENA_MAX_BLOCK && has_room(t, s, size);
}

int vela_arena_keep(vela_table *t, uint32_t s, uint32_t ref)
{
    vela_stripe *st = &t->stripes[s];
    vela_block *b = blk(t, ref);
    uint32_t size = vela_block_size(b);
    if (!vela_arena_would_keep(t, s, size))
        return 0;
    /* The caller recorded ref in pending: a crash before the head store leaves
     * it there for repair. */
    b->kind = VELA_KIND_ARENA;
    vela_entry_of(b)->next = st->arena;
    vela_debug_stall(7);
    __atomic_store_n(&st->arena, ref, __ATOMIC_RELEASE);
    st->arena_blocks++;
    st->arena_bytes += size;
    return 1;
}

/* Room for two more blocks of `size` bytes (the refill's, which the heap may
 * make up to VELA_MIN_BLOCK - 8 bytes larger, and the one a replacing put gives
 * back right after, without a second heap hold). */
static int room_for_two(const vela_table *t, uint32_t s, uint32_t size)
{
    return t->stripes[s].arena_blocks + 1 < ARENA_BLOCKS && has_room(t, s, 2 * (uint64_t)size + VELA_MIN_BLOCK);
}

/* Free the oldest spare block (the chain's last) to the heap. */
static void drop_oldest(vela_table *t, uint32_t s)
{
    vela_stripe *st = &t->stripes[s];
    uint32_t *link = &st->arena;
    while (vela_entry_of(blk(t, *link))->next)
        link = &vela_entry_of(blk(t, *link))->next;
    uint32_t ref = *link;
    st->pending[1] = ref;
    *link = 0;
    st->arena_blocks--;
    st->arena_bytes -= vela_block_size(blk(t, ref));
    vela_heap_free(t, ref);
    st->pending[1] = 0;
}

void vela_arena_refill(vela_table *t, uint32_t s, uint32_t size)
{
    vela_stripe *st = &t->stripes[s];
    if (size > ARENA_MAX_BLOCK || 2 * (uint64_t)size + VELA_MIN_BLOCK > budget(t))
        return;
    /* The arena follows the sizes asked for: a miss makes room for its size
     * by giving the oldest spare blocks back. */
    while (st->arena && !room_for_two(t, s, size))
        drop_oldest(t, s);
    for (int i = 0; i < ARENA_REFILL && room_for_two(t, s, size); i++) {
        uint32_t ref = vela_heap_alloc(t, size, s, 1); /* recorded in pending[1] */
        if (!ref)
            break; /* refills take free memory only, never evict */
        vela_debug_stall(8);
        if (!vela_arena_keep(t, s, ref))
            vela_heap_free(t, ref); /* the heap gave a larger block than the room left */
        st->pending[1] = 0;
    }
}

void vela_arena_drain(vela_table *t, uint32_t s)
{
    vela_stripe *st = &t->stripes[s];
    while (st->arena) {
        uint32_t ref = st->arena;
        vela_block *b = blk(t, ref);
        st->pending[1] = ref;
        st->arena = vela_entry_of(b)->next;
        st->arena_blocks--;
        st->arena_bytes -= vela_block_size(b);
        vela_heap_free(t, ref);
        st->pending[1] = 0;
    }
    st->arena_blocks = 0;
    st->arena_bytes = 0;
}

void vela_arena_reclaim(vela_table *t, uint32_t s)
{
    for (uint32_t o = 0; o <= t->stripe_mask; o++) {
        if (!__atomic_load_n(&t->stripes[o].arena, __ATOMIC_RELAXED))
            continue;
        if (o == s) {
            vela_arena_drain(t, o);
        } else if (vela_stripe_trylock_holding_heap(t, o)) {
            vela_arena_drain(t, o);
            vela_stripe_unlock(t, o);
        }
    }
}

/* Is ref a used block of stripe s of one of the given kinds (a sound arena or
 * pending block)? O(blocks): repair and check only. */
static int owned_block(vela_table *t, uint32_t s, uint32_t ref, int entry_too)
{
    if (ref < vela_heap_first(t) || ref >= vela_heap_end(t) || !vela_heap_is_block(t, ref))
        return 0;
    vela_block *b = blk(t, ref);
    return (b->size_flags & VELA_BLK_USED) && b->owner == s &&
           (b->kind == VELA_KIND_ARENA || (entry_too && b->kind == VELA_KIND_ENTRY));
}

static int in_arena(vela_table *t, uint32_t s, uint32_t ref)
{
    uint32_t p = t->stripes[s].arena;
    for (int steps = 0; p && steps <= ARENA_BLOCKS; steps++) {
        if (p == ref)
            return 1;
        vela_block *b = blk(t, p);
        if (p < vela_heap_first(t) || p >= vela_heap_end(t) || !(b->size_flags & VELA_BLK_USED) ||
            b->kind != VELA_KIND_ARENA || b->owner != s)
            return 0; /* the repair below cuts the chain here */
        p = vela_entry_of(blk(t, p))->next;
    }
    return 0;
}

void vela_arena_repair(vela_table *t, uint32_t s, int (*reachable)(void *ctx, uint32_t ref), void *ctx)
{
    vela_stripe *st = &t->stripes[s];
    /* What the dead write allocated, unlinked or moved, unless a chain reaches
     * it or the arena holds it (then it is given back with the arena). */
    for (int slot = 0; slot < 2; slot++) {
        uint32_t p = st->pending[slot];
        if (p && !reachable(ctx, p) && !in_arena(t, s, p) && owned_block(t, s, p, 1))
            vela_heap_free(t, p);
        st->pending[slot] = 0;
    }
    /* The arena: every sound block back to the heap; the chain is cut at the
     * first one that is not (it cannot be trusted to be free). */
    uint64_t steps = 0;
    while (st->arena && steps++ <= ARENA_BLOCKS) {
        uint32_t ref = st->arena;
        if (reachable(ctx, ref) || !owned_block(t, s, ref, 0))
            break;
        st->pending[1] = ref;
        st->arena = vela_entry_of(blk(t, ref))->next;
        vela_heap_free(t, ref);
        st->pending[1] = 0;
    }
    st->arena = 0;
    st->arena_blocks = 0;
    st->arena_bytes = 0;
}

void vela_arena_check(vela_table *t, uint32_t s, vela_report *r, const uint8_t *arena_map, uint64_t *blocks)
{
    vela_stripe *st = &t->stripes[s];
    uint32_t first = vela_heap_first(t);
    uint64_t n = 0, bytes = 0;
    for (uint32_t ref = st->arena; ref; ref = vela_entry_of(blk(t, ref))->next) {
        uint32_t i = ref - first;
        if (ref < first || ref >= vela_heap_end(t) || !(arena_map[i >> 3] & (1u << (i & 7))) ||
            blk(t, ref)->owner != s) {
            vela_report_add(r, "stripe %u: arena link to offset %llu is not a spare block of the stripe", s,
                            (unsigned long long)ref << 3);
            return;
        }
        if (++n > st->arena_blocks) {
            vela_report_add(r, "stripe %u: the arena chain is longer than its count %u (cycle?)", s,
                            st->arena_blocks);
            return;
        }
        bytes += vela_block_size(blk(t, ref));
    }
    if (n != st->arena_blocks || bytes != st->arena_bytes)
        vela_report_add(r, "stripe %u: arena counters say %u blocks, %llu bytes; the chain holds %llu, %llu", s,
                        st->arena_blocks, (unsigned long long)st->arena_bytes, (unsigned long long)n,
                        (unsigned long long)bytes);
    if (n > ARENA_BLOCKS || bytes > budget(t))
        vela_report_add(r, "stripe %u: the arena holds %llu blocks, %llu bytes, over its bound", s,
                        (unsigned long long)n, (unsigned long long)bytes);
    *blocks += n;
}

vela_err vela_arena_give_back(vela_table *t, uint32_t s)
{
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    if ((err = vela_heap_lock(t)) == VELA_OK) {
        vela_arena_drain(t, s);
        vela_heap_unlock(t);
    }
    vela_stripe_unlock(t, s);
    return err;
}

uint64_t vela_arena_spare_bytes(const vela_table *t)
{
    uint64_t n = 0;
    for (uint32_t s = 0; s <= t->stripe_mask; s++)
        n += __atomic_load_n(&t->stripes[s].arena_bytes, __ATOMIC_RELAXED);
    return n;
}

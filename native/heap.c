/*
 * heap.c -- the segment's entry memory: one heap for all stripes, so any entry
 * up to max_entry_size fits whatever its stripe (no rigid per-stripe shares).
 *
 * TLSF (two-level segregated fit): free blocks sit in 26 x 16 size-class lists
 * found through two bitmaps, so alloc and free are O(1); neighbours coalesce
 * at once (boundary tags: a free block's size is also in its last 4 bytes, and
 * the next block's PREV_FREE bit says so), which is what keeps mixed sizes
 * from ending in "no memory while memory is free". When no free block fits,
 * evict.c walks the clock hand over blocks in address order, so evictions
 * free neighbours and make contiguous room.
 *
 * A used block is an entry or a spare block of a stripe's arena (arena.c),
 * which its stripe's lock holder hands out and takes back without the heap
 * lock, changing only the block's kind and link, never its size or flags.
 *
 * All of it runs under the heap lock. Crash safety: the physical chain (block
 * sizes) is changed only by single stores that keep it walkable, so a dead
 * owner's heap is rebuilt by vela_heap_repair from one walk.
 */
#include <stdlib.h>

#include "vela.h"

#define MAX_BLOCK 0x80000000u /* a block is smaller than 2 GiB; sizes fit 32 bits */

static inline vela_free_block *fblk(const vela_table *t, uint32_t ref) { return (vela_free_block *)vela_at(t, ref); }
static inline int is_used(const vela_block *b) { return b->size_flags & VELA_BLK_USED; }

uint32_t vela_heap_first(const vela_table *t) { return (uint32_t)(t->hdr->heap_off >> 3); }
/* Ref of the sentinel: the last 8 bytes of the heap. */
uint32_t vela_heap_end(const vela_table *t) { return (uint32_t)((t->hdr->heap_end >> 3) - 1); }

static inline uint32_t next_of(const vela_table *t, uint32_t ref) { return ref + (vela_block_size(blk(t, ref)) >> 3); }

static inline void set_footer(const vela_table *t, uint32_t ref, uint32_t size)
{
    *(uint32_t *)((uint8_t *)vela_at(t, ref) + size - 4) = size;
}

static void mapping(uint32_t size, uint32_t *fl, uint32_t *sl)
{
    if (size < VELA_SMALL_LIMIT) {
        *fl = 0;
        *sl = size / (VELA_SMALL_LIMIT / VELA_SL_COUNT);
    } else {
        uint32_t f = 31u - (uint32_t)__builtin_clz(size);
        *sl = (size >> (f - VELA_SL_BITS)) & (VELA_SL_COUNT - 1);
        *fl = f - 7;
    }
}

static void insert_free(vela_table *t, uint32_t ref)
{
    vela_heap_state *h = &t->hdr->heap;
    vela_free_block *b = fblk(t, ref);
    uint32_t fl, sl;
    mapping(vela_block_size(&b->hdr), &fl, &sl);
    b->next = h->heads[fl][sl];
    b->prev = 0;
    if (b->next)
        fblk(t, b->next)->prev = ref;
    h->heads[fl][sl] = ref;
    h->fl_bitmap |= 1u << fl;
    h->sl_bitmap[fl] |= 1u << sl;
}

static void remove_free(vela_table *t, uint32_t ref)
{
    vela_heap_state *h = &t->hdr->heap;
    vela_free_block *b = fblk(t, ref);
    uint32_t fl, sl;
    mapping(vela_block_size(&b->hdr), &fl, &sl);
    if (b->next)
        fblk(t, b->next)->prev = b->prev;
    if (b->prev)
        fblk(t, b->prev)->next = b->next;
    else
        h->heads[fl][sl] = b->next;
    if (!h->heads[fl][sl]) {
        h->sl_bitmap[fl] &= ~(1u << sl);
        if (!h->sl_bitmap[fl])
            h->fl_bitmap &= ~(1u << fl);
    }
    b->next = b->prev = 0;
}

/* Lay down free blocks over [ref, end) with no used block in between. */
static void add_free_run(vela_table *t, uint32_t ref, uint64_t bytes)
{
    while (bytes >= VELA_MIN_BLOCK) {
        uint32_t size = bytes > MAX_BLOCK - 8 ? (MAX_BLOCK - 8) : (uint32_t)bytes;
        if (bytes - size > 0 && bytes - size < VELA_MIN_BLOCK)
            size -= VELA_MIN_BLOCK; /* leave a valid block for the rest */
        vela_block *b = blk(t, ref);
        b->size_flags = size;
        b->owner = 0;
        b->kind = VELA_KIND_FREE;
        b->access = 0;
        set_footer(t, ref, size);
        insert_free(t, ref);
        ref += size >> 3;
        bytes -= size;
    }
}

void vela_heap_init(vela_table *t)
{
    vela_heap_state *h = &t->hdr->heap;
    uint32_t first = vela_heap_first(t), end = vela_heap_end(t);
    vela_block *sentinel = blk(t, end);
    add_free_run(t, first, ((uint64_t)(end - first)) << 3);
    sentinel->size_flags = 8 | VELA_BLK_USED | VELA_BLK_PREV_FREE;
    sentinel->kind = VELA_KIND_SENTINEL;
    h->hand = first;
    h->used_bytes = 0;
}

uint32_t vela_heap_take(vela_table *t, uint32_t ref, uint32_t size, uint32_t s, int slot)
{
    vela_block *b = blk(t, ref);
    uint32_t have = vela_block_size(b);
    remove_free(t, ref);
    if (have - size >= VELA_MIN_BLOCK) {
        /* Split: the remainder's header first, then shrink (one store). */
        uint32_t rest = ref + (size >> 3);
        vela_block *r = blk(t, rest);
        r->size_flags = have - size;
        r->owner = 0;
        r->kind = VELA_KIND_FREE;
        r->access = 0;
        set_footer(t, rest, have - size);
        b->size_flags = size | (b->size_flags & VELA_BLK_PREV_FREE);
        insert_free(t, rest);
    } else {
        size = have;
        vela_block *n = blk(t, next_of(t, ref));
        n->size_flags &= ~VELA_BLK_PREV_FREE;
    }
    vela_debug_stall(4);
    b->owner = (uint16_t)s;
    b->kind = VELA_KIND_ENTRY;
    b->access = 0;
    /* Known to the stripe before it is used: a crash from here on leaves a
     * block the stripe's repair can find and free. */
    t->stripes[s].pending[slot] = ref;
    __atomic_store_n(&b->size_flags, b->size_flags | VELA_BLK_USED, __ATOMIC_RELEASE);
    t->hdr->heap.used_bytes += size;
    return ref;
}

uint32_t vela_heap_alloc(vela_table *t, uint32_t size, uint32_t s, int slot)
{
    vela_heap_state *h = &t->hdr->heap;
    uint32_t fl, sl;
    /* Good fit first: the head of the request's own class often fits. */
    mapping(size, &fl, &sl);
    uint32_t ref = h->heads[fl][sl];
    if (ref && vela_block_size(blk(t, ref)) >= size)
        return vela_heap_take(t, ref, size, s, slot);
    /* Then the first class whose every block fits. */
    uint64_t rounded = size;
    if (size >= VELA_SMALL_LIMIT)
        rounded += (1u << (31u - (uint32_t)__builtin_clz(size) - VELA_SL_BITS)) - 1;
    else
        rounded += VELA_SMALL_LIMIT / VELA_SL_COUNT - 1;
    if (rounded >= MAX_BLOCK)
        return 0;
    mapping((uint32_t)rounded, &fl, &sl);
    uint32_t slmap = h->sl_bitmap[fl] & (~0u << sl);
    if (!slmap) {
        uint32_t flmap = fl + 1 < 32 ? h->fl_bitmap & (~0u << (fl + 1)) : 0;
        if (!flmap)
            return 0;
        fl = (uint32_t)__builtin_ctz(flmap);
        slmap = h->sl_bitmap[fl];
    }
    sl = (uint32_t)__builtin_ctz(slmap);
    ref = h->heads[fl][sl];
    if (!ref || vela_block_size(blk(t, ref)) < size)
        return 0;
    return vela_heap_take(t, ref, size, s, slot);
}

uint32_t vela_heap_free(vela_table *t, uint32_t ref)
{
    vela_heap_state *h = &t->hdr->heap;
    vela_block *b = blk(t, ref);
    uint32_t size = vela_block_size(b);
    h->used_bytes -= size;
    b->kind = VELA_KIND_FREE;
    vela_debug_stall(5);
    __atomic_store_n(&b->size_flags, b->size_flags & ~VELA_BLK_USED, __ATOMIC_RELEASE);

    uint32_t next = ref + (size >> 3);
    vela_block *n = blk(t, next);
    if (!is_used(n) && (uint64_t)size + vela_block_size(n) < MAX_BLOCK) {
        remove_free(t, next);
        size += vela_block_size(n);
        b->size_flags = size | (b->size_flags & VELA_BLK_PREV_FREE);
        if (h->hand == next)
            h->hand = ref;
    }
    if (b->size_flags & VELA_BLK_PREV_FREE) {
        uint32_t prev_size = *(uint32_t *)((uint8_t *)b - 4);
        uint32_t prev = ref - (prev_size >> 3);
        vela_block *p = blk(t, prev);
        if ((uint64_t)prev_size + size < MAX_BLOCK) {
            remove_free(t, prev);
            size += prev_size;
            p->size_flags = size | (p->size_flags & VELA_BLK_PREV_FREE);
            if (h->hand == ref)
                h->hand = prev;
            ref = prev;
            b = p;
        }
    }
    set_footer(t, ref, size);
    blk(t, ref + (size >> 3))->size_flags |= VELA_BLK_PREV_FREE;
    insert_free(t, ref);
    return ref;
}

int vela_heap_is_block(vela_table *t, uint32_t target)
{
    uint32_t end = vela_heap_end(t);
    for (uint32_t ref = vela_heap_first(t); ref <= end;) {
        if (ref == target)
            return 1;
        if (ref > target)
            return 0;
        uint32_t size = vela_block_size(blk(t, ref));
        if (size < 8)
            return 0;
        ref += size >> 3;
    }
    return 0;
}

vela_err vela_heap_repair(vela_table *t)
{
    vela_heap_state *h = &t->hdr->heap;
    uint32_t first = vela_heap_first(t), end = vela_heap_end(t);
    memset(h->heads, 0, sizeof h->heads);
    memset(h->sl_bitmap, 0, sizeof h->sl_bitmap);
    h->fl_bitmap = 0;
    uint64_t used = 0;
    uint32_t run = 0; /* start of the free run being collected, 0 = none */
    uint32_t ref = first;
    while (ref < end) {
        vela_block *b = blk(t, ref);
        uint32_t size = vela_block_size(b);
        if (size < 8 || (uint64_t)ref + (size >> 3) > end)
            return vela_fail(VELA_ECORRUPT, "heap block at offset %llu has an impossible size %u",
                             (unsigned long long)ref << 3, size);
        if (is_used(b) && b->kind != VELA_KIND_ENTRY && b->kind != VELA_KIND_ARENA) {
            /* A free cut short (kind stored, USED not yet cleared): its entry was
             * already unlinked, so the block is free. */
            b->size_flags &= ~VELA_BLK_USED;
        }
        if (is_used(b)) {
            if (run) {
                add_free_run(t, run, ((uint64_t)(ref - run)) << 3);
                b->size_flags |= VELA_BLK_PREV_FREE;
                run = 0;
            } else {
                b->size_flags &= ~VELA_BLK_PREV_FREE;
            }
            used += size;
        } else if (!run) {
            run = ref;
        }
        ref += size >> 3;
    }
    if (ref != end)
        return vela_fail(VELA_ECORRUPT, "heap blocks overrun the sentinel");
    vela_block *sentinel = blk(t, end);
    if (run) {
        add_free_run(t, run, ((uint64_t)(end - run)) << 3);
        sentinel->size_flags = 8 | VELA_BLK_USED | VELA_BLK_PREV_FREE;
    } else {
        sentinel->size_flags = 8 | VELA_BLK_USED;
    }
    sentinel->kind = VELA_KIND_SENTINEL;
    h->used_bytes = used;
    h->hand = first;
    return VELA_OK;
}

void vela_heap_check(vela_table *t, vela_report *r, uint8_t *used_map, uint8_t *arena_map)
{
    vela_heap_state *h = &t->hdr->heap;
    uint32_t first = vela_heap_first(t), end = vela_heap_end(t);
    uint64_t used = 0, free_blocks = 0, listed = 0;
    int prev_free = 0, hand_ok = 0;
    uint32_t prev_size = 0;
    uint32_t ref = first;
    while (ref < end) {
        vela_block *b = blk(t, ref);
        uint32_t size = vela_block_size(b);
        if (ref == h->hand)
            hand_ok = 1;
        if (size < 8 || (uint64_t)ref + (size >> 3) > end) {
            vela_report_add(r, "heap: block at offset %llu has impossible size %u; walk stopped",
                            (unsigned long long)ref << 3, size);
            return;
        }
        if (!!(b->size_flags & VELA_BLK_PREV_FREE) != prev_free)
            vela_report_add(r, "heap: block at offset %llu has PREV_FREE=%d but its predecessor is %s",
                            (unsigned long long)ref << 3, !prev_free, prev_free ? "free" : "used");
        if (is_used(b)) {
            used += size;
            if (b->kind == VELA_KIND_ENTRY || b->kind == VELA_KIND_ARENA)
                (b->kind == VELA_KIND_ENTRY ? used_map : arena_map)[(ref - first) >> 3] |=
                    (uint8_t)(1u << ((ref - first) & 7));
            else
                vela_report_add(r, "heap: used block at offset %llu has kind %u",
                                (unsigned long long)ref << 3, b->kind);
            prev_free = 0;
        } else {
            free_blocks++;
            if (size < VELA_MIN_BLOCK)
                vela_report_add(r, "heap: free block at offset %llu is smaller than the minimum (%u)",
                                (unsigned long long)ref << 3, size);
            if (prev_free && (uint64_t)prev_size + size < MAX_BLOCK)
                vela_report_add(r, "heap: free blocks at offset %llu and before it were not coalesced",
                                (unsigned long long)ref << 3);
            if (*(uint32_t *)((uint8_t *)b + size - 4) != size)
                vela_report_add(r, "heap: free block at offset %llu has a wrong footer",
                                (unsigned long long)ref << 3);
            prev_free = 1;
        }
        prev_size = size;
        ref += size >> 3;
    }
    if (ref != end)
        vela_report_add(r, "heap: blocks overrun the sentinel");
    if (h->hand != end && !hand_ok)
        vela_report_add(r, "heap: the clock hand (offset %llu) is not at a block",
                        (unsigned long long)h->hand << 3);
    if (used != h->used_bytes)
        vela_report_add(r, "heap: used_bytes says %llu, blocks add up to %llu",
                        (unsigned long long)h->used_bytes, (unsigned long long)used);
    /* Every list holds free blocks of its own class, linked both ways. */
    for (uint32_t fl = 0; fl < VELA_FL_COUNT; fl++) {
        for (uint32_t sl = 0; sl < VELA_SL_COUNT; sl++) {
            uint32_t prev = 0, n = 0;
            for (uint32_t f = h->heads[fl][sl]; f; f = fblk(t, f)->next) {
                vela_free_block *fb = fblk(t, f);
                uint32_t cf, cs;
                if (f < first || f >= end || is_used(&fb->hdr)) {
                    vela_report_add(r, "heap: list (%u,%u) holds a block that is not free", fl, sl);
                    break;
                }
                mapping(vela_block_size(&fb->hdr), &cf, &cs);
                if (cf != fl || cs != sl)
                    vela_report_add(r, "heap: block of %u bytes is in list (%u,%u)",
                                    vela_block_size(&fb->hdr), fl, sl);
                if (fb->prev != prev)
                    vela_report_add(r, "heap: list (%u,%u) has a broken back link", fl, sl);
                prev = f;
                if (++n > free_blocks) {
                    vela_report_add(r, "heap: list (%u,%u) has a cycle", fl, sl);
                    break;
                }
            }
            listed += n;
            int bit = !!(h->sl_bitmap[fl] & (1u << sl));
            if (bit != (h->heads[fl][sl] != 0))
                vela_report_add(r, "heap: bitmap of list (%u,%u) disagrees with the list", fl, sl);
        }
        if (!!(h->fl_bitmap & (1u << fl)) != (h->sl_bitmap[fl] != 0))
            vela_report_add(r, "heap: first-level bitmap bit %u disagrees", fl);
    }
    if (listed != free_blocks)
        vela_report_add(r, "heap: %llu free blocks, %llu in the lists",
                        (unsigned long long)free_blocks, (unsigned long long)listed);
}

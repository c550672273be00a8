/*
 * rebuild.c -- re-making every structure of a table from the entries that can
 * be trusted. The file backend runs it when the first process opens a file
 * (after a clean close as after a crash or a damaged disk): locks in a file
 * are stale after a restart, and a file may have been damaged in any byte.
 *
 * What is kept: entries reachable from the bucket chains whose block and
 * fields are in range, whose checksum matches (it covers key, value, tags,
 * expiry and version), which do not overlap a kept neighbour and have not
 * expired. Everything else becomes free memory. A chain is followed only
 * through entries that validate, so a damaged link loses the rest of its
 * chain and nothing else. Work: O(entries + heap blocks) plus the checksums.
 */
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "vela.h"

static int cmp_ref(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Mark [ref, ref + bytes) free (bytes >= 24), as one or more free blocks. */
static void free_gap(vela_table *t, uint32_t ref, uint64_t bytes)
{
    /* The heap's own builder keeps the size limits and list invariants. */
    while (bytes >= VELA_MIN_BLOCK) {
        uint32_t size = bytes > 0x7FFFFFF8u ? 0x40000000u : (uint32_t)bytes;
        vela_block *b = blk(t, ref);
        b->size_flags = size | VELA_BLK_USED; /* freed below: coalescing does the rest */
        b->kind = VELA_KIND_ENTRY;
        t->hdr->heap.used_bytes += size;
        vela_heap_free(t, ref);
        ref += size >> 3;
        bytes -= size;
    }
}

vela_err vela_rebuild(vela_table *t, uint64_t *kept_out, uint64_t *dropped_out)
{
    vela_header *h = t->hdr;
    vela_err err = VELA_OK;
    uint32_t first = vela_heap_first(t), end = vela_heap_end(t);
    uint64_t limit = (uint64_t)(end - first);
    size_t cap = 1024, n = 0;
    uint64_t dropped = 0;
    int64_t now = vela_now(t);
    uint32_t *refs = malloc(cap * sizeof *refs);
    if (!refs)
        return vela_fail(VELA_ESYS, "out of process memory rebuilding the table");

    /* Locks and per-process state from an earlier life mean nothing now. */
    if ((err = vela_lock_init(&h->admin)) != VELA_OK || (err = vela_lock_init(&h->heap.lock)) != VELA_OK)
        goto out;
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        vela_stripe *st = &t->stripes[s];
        if ((err = vela_lock_init(&st->lock)) != VELA_OK)
            goto out;
        st->seq = 0;
        st->pending[0] = st->pending[1] = 0;
        st->arena = st->arena_blocks = 0; /* spare blocks are no entries: the re-laid heap frees them */
        st->arena_bytes = 0;
        st->sweep_cursor = 0;
        st->repair_due = 0;
    }
    memset(t->leases, 0, (size_t)(t->stripe_mask + 1) * VELA_LEASES_PER_STRIPE * sizeof(vela_lease));
    for (uint32_t i = 0; i < VELA_STAT_SLOTS; i++)
        memset(&t->slots[i], 0, sizeof t->slots[i]);
    h->sweeper_pid = 0;
    h->poisoned = 0;

    /* 1. Collect the entries that validate, following chains only through them. */
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        uint32_t *buckets = &t->buckets[(uint64_t)s * (t->bucket_mask + 1)];
        for (uint32_t i = 0; i <= t->bucket_mask; i++) {
            uint64_t steps = 0;
            for (uint32_t ref = buckets[i]; ref && steps++ < limit;) {
                if (vela_entry_problem(t, s, ref)) {
                    dropped++;
                    break;
                }
                vela_entry *e = vela_entry_of(blk(t, ref));
                if (((e->hash >> 32) & t->bucket_mask) != i) {
                    dropped++;
                    break;
                }
                if (n == cap) {
                    uint32_t *grown = realloc(refs, (cap *= 2) * sizeof *refs);
                    if (!grown) {
                        err = vela_fail(VELA_ESYS, "out of process memory rebuilding the table");
                        goto out;
                    }
                    refs = grown;
                }
                refs[n++] = ref;
                ref = e->next;
            }
        }
    }
    /* 2. In address order: drop duplicates and overlaps, and what has expired. */
    qsort(refs, n, sizeof *refs, cmp_ref);
    size_t kept = 0;
    uint64_t cursor = first;
    for (size_t i = 0; i < n; i++) {
        uint32_t ref = refs[i];
        uint32_t size = vela_block_size(blk(t, ref));
        if (ref < cursor || (uint64_t)ref + (size >> 3) > end ||
            vela_is_expired(t, vela_entry_of(blk(t, ref)), now)) {
            dropped++;
            continue;
        }
        refs[kept++] = ref;
        cursor = (uint64_t)ref + (size >> 3);
    }

    /* 3. Lay the heap out again: kept blocks used, the gaps free. A gap too
     * small to be a free block is given to the block before it. */
    memset(h->heap.heads, 0, sizeof h->heap.heads);
    memset(h->heap.sl_bitmap, 0, sizeof h->heap.sl_bitmap);
    h->heap.fl_bitmap = 0;
    h->heap.used_bytes = 0;
    h->heap.hand = first;
    vela_block *sentinel = blk(t, end);
    sentinel->size_flags = 8 | VELA_BLK_USED;
    sentinel->kind = VELA_KIND_SENTINEL;
    cursor = first;
    for (size_t i = 0; i <= kept; i++) {
        uint32_t next = i < kept ? refs[i] : end;
        uint64_t gap = ((uint64_t)next - cursor) << 3;
        if (gap > 0 && gap < VELA_MIN_BLOCK && i > 0) {
            vela_block *prev = blk(t, refs[i - 1]);
            prev->size_flags += (uint32_t)gap;
            h->heap.used_bytes += gap;
        } else if (gap > 0) {
            free_gap(t, (uint32_t)cursor, gap);
        }
        if (i == kept)
            break;
        vela_block *b = blk(t, next);
        uint32_t size = vela_block_size(b);
        b->size_flags = size | VELA_BLK_USED;
        b->owner = (uint16_t)vela_stripe_of(t, vela_entry_of(b)->hash);
        b->kind = VELA_KIND_ENTRY;
        b->access = 0;
        h->heap.used_bytes += size;
        cursor = (uint64_t)next + (size >> 3);
        /* The free block before this one (if any) set PREV_FREE on it. */
        if (gap == 0 || gap < VELA_MIN_BLOCK)
            b->size_flags &= ~VELA_BLK_PREV_FREE;
        else
            b->size_flags |= VELA_BLK_PREV_FREE;
    }

    /* 4. Relink chains and tags, recount. */
    memset(t->buckets, 0, (size_t)(t->stripe_mask + 1) * (t->bucket_mask + 1) * sizeof(uint32_t));
    memset(t->tagbuckets, 0, (size_t)(t->stripe_mask + 1) * (t->tagbucket_mask + 1) * sizeof(uint32_t));
    for (uint32_t s = 0; s <= t->stripe_mask; s++)
        t->stripes[s].entries = t->stripes[s].bytes = t->stripes[s].tombstones = 0;
    uint64_t top_version = 0;
    for (size_t i = 0; i < kept; i++) {
        vela_block *b = blk(t, refs[i]);
        vela_entry *e = vela_entry_of(b);
        uint32_t s = b->owner;
        uint32_t *head = vela_bucket(t, s, e->hash);
        e->next = *head;
        *head = refs[i];
        vela_tags_link(t, s, e);
        t->stripes[s].entries++;
        t->stripes[s].tombstones += e->codec == VELA_CODEC_TOMBSTONE;
        t->stripes[s].bytes += vela_block_size(b);
        if (e->version > top_version)
            top_version = e->version;
    }
    if (h->version_clock < top_version)
        h->version_clock = top_version;
    *kept_out = kept;
    *dropped_out = dropped;
out:
    free(refs);
    return err;
}

vela_err vela_sync(vela_table *t)
{
    if (msync(t->base, t->size, MS_SYNC) != 0)
        return vela_fail_sys("msync", "writing the cache file to disk");
    return VELA_OK;
}

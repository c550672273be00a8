/*
 * repair.c -- putting a stripe right after its lock owner died mid-operation.
 *
 * What a dead owner can have left (see table.c for the write order):
 *   - a block allocated for a put that was never published  -> pending[0]
 *   - an entry unlinked but not yet freed                     -> pending[1]
 *   - a block on its way into or out of the arena             -> pending[0/1]
 *   - tag chains half updated, counters off by one
 * Published entries are whole (they were filled before the publishing store),
 * so repair keeps every entry a chain reaches and that validates, frees the
 * pending blocks no chain reaches, gives the stripe's arena back to the heap,
 * rebuilds the stripe's tag chains from its entries and recounts it. Work: O(entries of the stripe), plus a heap walk
 * for each pending or spare block that must be confirmed to be a block boundary.
 */
#include <stdlib.h>

#include "vela.h"

const char *vela_entry_problem(vela_table *t, uint32_t s, uint32_t ref)
{
    uint32_t first = vela_heap_first(t), end = vela_heap_end(t);
    if (ref < first || ref >= end)
        return "link points outside the heap";
    vela_block *b = blk(t, ref);
    uint32_t size = vela_block_size(b);
    if (!(b->size_flags & VELA_BLK_USED) || b->kind != VELA_KIND_ENTRY)
        return "link points at a block that is not a used entry";
    if (b->owner != s)
        return "entry block belongs to another stripe";
    if (size < VELA_ENTRY_OVERHEAD || (uint64_t)ref + (size >> 3) > end)
        return "entry block has an impossible size";
    vela_entry *e = vela_entry_of(b);
    if (e->key_len > VELA_MAX_KEY || e->ntags > VELA_MAX_TAGS || e->codec >= VELA_CODEC_COUNT)
        return "entry header fields are out of range";
    if (vela_entry_block_size(e->key_len, e->value_len, e->ntags) > size)
        return "entry is larger than its block";
    if (vela_stripe_of(t, e->hash) != s)
        return "entry hash belongs to another stripe";
    if (e->check != vela_entry_checksum(e))
        return "entry checksum mismatch";
    return NULL;
}

static int cmp_ref(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

typedef struct { const uint32_t *refs; size_t n; } sorted_refs;

static int is_reached(void *ctx, uint32_t ref)
{
    const sorted_refs *r = ctx;
    return bsearch(&ref, r->refs, r->n, sizeof *r->refs, cmp_ref) != NULL;
}

vela_err vela_stripe_repair(vela_table *t, uint32_t s, int heap_held)
{
    vela_stripe *st = &t->stripes[s];
    vela_err err = VELA_OK;
    if (!heap_held && (err = vela_heap_lock(t)) != VELA_OK)
        return err;

    if (!(st->seq & 1)) /* lock-free readers must not trust what repair changes */
        vela_write_begin(t, s);
    size_t cap = (size_t)st->entries + 64, n = 0;
    uint32_t *refs = malloc(cap * sizeof *refs);
    if (!refs) {
        err = vela_fail(VELA_ESYS, "out of process memory repairing stripe %u", s);
        goto out;
    }
    uint64_t bytes = 0;
    uint64_t limit = (t->size >> 3) + 1; /* more links than blocks: a cycle */
    uint32_t *buckets = &t->buckets[(uint64_t)s * (t->bucket_mask + 1)];
    for (uint32_t i = 0; i <= t->bucket_mask; i++) {
        uint32_t *link = &buckets[i];
        uint64_t steps = 0;
        while (*link) {
            uint32_t ref = *link;
            const char *problem = vela_entry_problem(t, s, ref);
            vela_entry *e = problem ? NULL : vela_entry_of(blk(t, ref));
            if (!problem && ((e->hash >> 32) & t->bucket_mask) != i)
                problem = "entry is in the wrong bucket";
            if (problem || ++steps > limit) {
                *link = 0; /* cut the chain before what cannot be trusted */
                break;
            }
            if (n == cap) {
                uint32_t *grown = realloc(refs, (cap *= 2) * sizeof *refs);
                if (!grown) {
                    err = vela_fail(VELA_ESYS, "out of process memory repairing stripe %u", s);
                    goto out;
                }
                refs = grown;
            }
            refs[n++] = ref;
            bytes += vela_block_size(blk(t, ref));
            link = &e->next;
        }
    }
    qsort(refs, n, sizeof *refs, cmp_ref);

    /* Free what the dead write allocated or unlinked and no chain reaches,
     * and give the arena back to the heap. */
    sorted_refs reached = {refs, n};
    vela_arena_repair(t, s, is_reached, &reached);

    /* Rebuild the tag chains from the entries. */
    memset(&t->tagbuckets[(uint64_t)s * (t->tagbucket_mask + 1)], 0,
           (size_t)(t->tagbucket_mask + 1) * sizeof(uint32_t));
    uint32_t tombstones = 0;
    for (size_t i = 0; i < n; i++) {
        vela_entry *e = vela_entry_of(blk(t, refs[i]));
        vela_tags_link(t, s, e);
        tombstones += e->codec == VELA_CODEC_TOMBSTONE;
    }

    st->entries = n;
    st->tombstones = tombstones;
    st->bytes = bytes;
out:
    if (st->seq & 1)
        __atomic_store_n(&st->seq, st->seq + 1, __ATOMIC_RELEASE);
    free(refs);
    if (!heap_held)
        vela_heap_unlock(t);
    return err;
}

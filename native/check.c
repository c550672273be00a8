/*
 * check.c -- verify every invariant of a table (tests, inspect_shm --check).
 *
 * Stops the world: takes every stripe lock in ascending order, then the heap
 * lock (lock.c explains why that cannot deadlock), so what it sees is one
 * consistent state: the heap, every stripe's chains, tags and arena, and that
 * every used block is an entry a chain reaches or a spare block of one arena.
 * Cost: O(blocks + buckets); a diagnostic, not a hot path.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "vela.h"

#define MAX_LINES 200

void vela_report_add(vela_report *r, const char *fmt, ...)
{
    if (r->count >= MAX_LINES) {
        r->truncated = 1;
        return;
    }
    if (r->count == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        char **grown = realloc(r->lines, cap * sizeof *grown);
        if (!grown) {
            r->truncated = 1;
            return;
        }
        r->lines = grown;
        r->cap = cap;
    }
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char *line = strdup(buf);
    if (!line) {
        r->truncated = 1;
        return;
    }
    r->lines[r->count++] = line;
}

void vela_report_free(vela_report *r)
{
    for (size_t i = 0; i < r->count; i++)
        free(r->lines[i]);
    free(r->lines);
    memset(r, 0, sizeof *r);
}

static int test_bit(const uint8_t *map, uint32_t i) { return map[i >> 3] & (1u << (i & 7)); }
static void set_bit(uint8_t *map, uint32_t i) { map[i >> 3] |= (uint8_t)(1u << (i & 7)); }

/* Chains and tags of stripe s; marks every entry it reaches in `seen`. */
static void check_stripe(vela_table *t, uint32_t s, vela_report *r, uint8_t *seen, uint64_t *total)
{
    vela_stripe *st = &t->stripes[s];
    uint32_t first = vela_heap_first(t);
    uint64_t entries = 0, bytes = 0, taglinks = 0, tombstones = 0;
    if (st->seq & 1)
        vela_report_add(r, "stripe %u: write sequence is odd with no writer", s);
    if (st->pending[0] || st->pending[1])
        vela_report_add(r, "stripe %u: pending blocks left by a finished write", s);
    uint32_t *buckets = &t->buckets[(uint64_t)s * (t->bucket_mask + 1)];
    for (uint32_t i = 0; i <= t->bucket_mask; i++) {
        for (uint32_t ref = buckets[i]; ref;) {
            const char *problem = vela_entry_problem(t, s, ref);
            if (problem) {
                vela_report_add(r, "stripe %u bucket %u: entry at offset %llu: %s", s, i,
                                (unsigned long long)ref << 3, problem);
                break;
            }
            if (test_bit(seen, ref - first)) {
                vela_report_add(r, "stripe %u bucket %u: entry at offset %llu is linked twice (cycle?)",
                                s, i, (unsigned long long)ref << 3);
                break;
            }
            set_bit(seen, ref - first);
            vela_entry *e = vela_entry_of(blk(t, ref));
            if (((e->hash >> 32) & t->bucket_mask) != i)
                vela_report_add(r, "stripe %u: entry at offset %llu is in bucket %u, its hash says %u", s,
                                (unsigned long long)ref << 3, i, (unsigned)((e->hash >> 32) & t->bucket_mask));
            entries++;
            tombstones += e->codec == VELA_CODEC_TOMBSTONE;
            bytes += vela_block_size(blk(t, ref));
            taglinks += e->ntags;
            /* every tag link is in its own tag chain */
            for (uint32_t k = 0; k < e->ntags; k++) {
                vela_taglink *tl = &vela_tags_of(e)[k];
                if ((tl->tag & 0xFF) != k)
                    vela_report_add(r, "stripe %u: tag link %u of an entry has index %u", s, k,
                                    (unsigned)(tl->tag & 0xFF));
            }
            ref = e->next;
        }
    }
    /* Tag chains: links of live entries of this stripe, back links right. */
    uint64_t linked = 0;
    uint32_t *tagheads = &t->tagbuckets[(uint64_t)s * (t->tagbucket_mask + 1)];
    for (uint32_t i = 0; i <= t->tagbucket_mask; i++) {
        uint32_t prev = 0;
        for (uint32_t l = tagheads[i]; l;) {
            vela_taglink *tl = (vela_taglink *)vela_at(t, l);
            vela_entry *e = (vela_entry *)(tl - (tl->tag & 0xFF)) - 1;
            uint32_t eref = vela_ref(t, (vela_block *)e - 1);
            if (eref < first || eref >= vela_heap_end(t) || !test_bit(seen, eref - first) ||
                vela_entry_problem(t, s, eref)) {
                vela_report_add(r, "stripe %u tag bucket %u: link at offset %llu is not part of a live entry",
                                s, i, (unsigned long long)l << 3);
                break;
            }
            if (((tl->tag >> 32) & t->tagbucket_mask) != i)
                vela_report_add(r, "stripe %u: tag link in the wrong tag bucket %u", s, i);
            if (tl->prev != prev)
                vela_report_add(r, "stripe %u tag bucket %u: broken back link", s, i);
            if (++linked > taglinks) {
                vela_report_add(r, "stripe %u: more tag links in chains than entries carry (cycle?)", s);
                break;
            }
            prev = l;
            l = tl->next;
        }
    }
    if (linked != taglinks)
        vela_report_add(r, "stripe %u: entries carry %llu tag links, the tag chains hold %llu", s,
                        (unsigned long long)taglinks, (unsigned long long)linked);
    if (tombstones != st->tombstones)
        vela_report_add(r, "stripe %u: counter says %u tombstones, chains hold %llu", s, st->tombstones,
                        (unsigned long long)tombstones);
    if (tombstones && t->hdr->topology == VELA_TOPOLOGY_LOCAL) /* (clusters keep deletes and invalidations) */
        vela_report_add(r, "stripe %u: tombstones in a local cache", s);
    if (entries != st->entries)
        vela_report_add(r, "stripe %u: counter says %llu entries, chains hold %llu", s,
                        (unsigned long long)st->entries, (unsigned long long)entries);
    if (bytes != st->bytes)
        vela_report_add(r, "stripe %u: counter says %llu bytes, entries take %llu", s,
                        (unsigned long long)st->bytes, (unsigned long long)bytes);
    *total += entries;
}

vela_err vela_check(vela_table *t, vela_report *r)
{
    vela_err err = VELA_OK;
    uint32_t locked = 0, heap_locked = 0;
    uint32_t first = vela_heap_first(t), end = vela_heap_end(t);
    size_t map_bytes = ((size_t)(end - first) >> 3) + 1;
    uint8_t *used = calloc(map_bytes, 1), *seen = calloc(map_bytes, 1), *spare = calloc(map_bytes, 1);
    if (!used || !seen || !spare) {
        err = vela_fail(VELA_ESYS, "out of process memory for the check's maps");
        goto out;
    }
    for (; locked <= t->stripe_mask; locked++)
        if ((err = vela_stripe_lock(t, locked)) != VELA_OK)
            goto out;
    if ((err = vela_heap_lock(t)) != VELA_OK)
        goto out;
    heap_locked = 1;

    if (t->hdr->poisoned)
        vela_report_add(r, "header: the table is marked poisoned");
    vela_heap_check(t, r, used, spare);
    uint64_t total = 0, in_arenas = 0;
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        check_stripe(t, s, r, seen, &total);
        vela_arena_check(t, s, r, spare, &in_arenas);
    }
    uint64_t leaked = 0, spare_blocks = 0;
    for (size_t i = 0; i < map_bytes; i++) {
        if (used[i] & ~seen[i])
            leaked += (uint64_t)__builtin_popcount(used[i] & ~seen[i]);
        spare_blocks += (uint64_t)__builtin_popcount(spare[i]);
    }
    if (leaked)
        vela_report_add(r, "heap: %llu used entry blocks are not reachable from any stripe (leaked)",
                        (unsigned long long)leaked);
    if (spare_blocks != in_arenas)
        vela_report_add(r, "heap: %llu spare blocks, the stripes' arenas hold %llu (leaked)",
                        (unsigned long long)spare_blocks, (unsigned long long)in_arenas);
    if (t->hdr->max_size && total > t->hdr->max_size)
        vela_report_add(r, "header: %llu entries exceed max_size %llu", (unsigned long long)total,
                        (unsigned long long)t->hdr->max_size);
    if (r->truncated)
        vela_report_add(r, "(more problems were found than are listed)");
out:
    if (heap_locked)
        vela_heap_unlock(t);
    while (locked > 0)
        vela_stripe_unlock(t, --locked);
    free(used);
    free(seen);
    free(spare);
    return err;
}

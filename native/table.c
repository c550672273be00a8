/*
 * table.c -- entries: find, put, conditional puts (add/replace/cas), remove, flush, tags,
 * expiry, incr, touch.
 *
 * Convention (memcached's): a public vela_* function takes the stripe lock and
 * calls a vela_do_* / static function that assumes it is held.
 *
 * Every change of an entry publishes a new block with one store (bucket head
 * or predecessor's `next`) and only then retires the old one: incr and touch
 * copy the entry rather than edit it in place, so an entry that a reader can
 * reach is never being written.
 */
#define XXH_INLINE_ALL
#include "xxhash.h"

#include "vela.h"

uint64_t vela_entry_block_size(size_t key_len, size_t value_len, size_t ntags)
{
    uint64_t n = (uint64_t)VELA_ENTRY_OVERHEAD + (uint64_t)ntags * sizeof(vela_taglink) + key_len;
    if (value_len > UINT32_MAX || n + value_len < n)
        return 0;
    n += value_len;
    return (n + VELA_ALIGN - 1) & ~(uint64_t)(VELA_ALIGN - 1);
}

uint32_t vela_entry_checksum(const vela_entry *e)
{
    /* Not covered: `next` and the tag links' next/prev, which neighbours rewrite. */
    uint64_t seed = e->hash ^ ((uint64_t)e->value_len << 32 | (uint64_t)e->key_len << 16 |
                               (uint64_t)e->codec << 8 | e->ntags);
    seed = XXH3_64bits_withSeed(&e->expire_at, sizeof e->expire_at + sizeof e->version, seed);
    const vela_taglink *tl = (const vela_taglink *)(e + 1);
    for (uint32_t i = 0; i < e->ntags; i++)
        seed = XXH3_64bits_withSeed(&tl[i].tag, sizeof tl[i].tag, seed);
    const uint8_t *key = (const uint8_t *)(tl + e->ntags);
    return (uint32_t)XXH3_64bits_withSeed(key, (size_t)e->key_len + e->value_len, seed);
}

void vela_write_begin(vela_table *t, uint32_t s)
{
    vela_stripe *st = &t->stripes[s];
    __atomic_store_n(&st->seq, st->seq + 1, __ATOMIC_RELAXED);
    /* The odd sequence is visible before any store of the write (read.c). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

void vela_write_end(vela_table *t, uint32_t s)
{
    vela_stripe *st = &t->stripes[s];
    st->pending[0] = st->pending[1] = 0;
    __atomic_store_n(&st->seq, st->seq + 1, __ATOMIC_RELEASE);
}

int vela_is_expired(const vela_table *t, const vela_entry *e, int64_t now)
{
    return e->expire_at != 0 && (now ? now : vela_now(t)) >= e->expire_at;
}

static __thread uint32_t rng_state = 2463534242u;

int vela_access_due(const vela_table *t, uint8_t access)
{
    switch (t->hdr->eviction) {
    case VELA_EVICT_LFU:
        /* Logarithmic counter (as Redis' LFU): the busier, the rarer a bump. */
        if (access == 255)
            return 0;
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 17;
        rng_state ^= rng_state << 5;
        return rng_state % ((uint32_t)access * 2 + 1) == 0;
    case VELA_EVICT_LRU:
        return access == 0;
    default:
        return 0; /* ttl_only keeps no marks */
    }
}

void vela_mark_access(vela_table *t, vela_block *b)
{
    uint8_t c = b->access;
    if (vela_access_due(t, c))
        __atomic_store_n(&b->access, (uint8_t)(c + 1), __ATOMIC_RELAXED);
}

/* Entries of all stripes. Derived, not kept in a global counter: a counter
 * updated apart from the stripe's could not be set right by a stripe repair.
 * O(stripes), off the get path (put pays it only when max_size is set). */
uint64_t vela_size(const vela_table *t)
{
    uint64_t n = 0;
    for (uint32_t s = 0; s <= t->stripe_mask; s++)
        n += __atomic_load_n(&t->stripes[s].entries, __ATOMIC_RELAXED) -
             __atomic_load_n(&t->stripes[s].tombstones, __ATOMIC_RELAXED);
    return n;
}

/* ---- tags ------------------------------------------------------------------- */

void vela_tags_link(vela_table *t, uint32_t s, vela_entry *e)
{
    vela_taglink *tl = vela_tags_of(e);
    for (uint32_t i = 0; i < e->ntags; i++) {
        uint32_t *head = vela_tagbucket(t, s, tl[i].tag);
        uint32_t me = vela_ref(t, &tl[i]);
        tl[i].prev = 0;
        tl[i].next = *head;
        if (*head)
            ((vela_taglink *)vela_at(t, *head))->prev = me;
        *head = me;
    }
}

void vela_tags_unlink(vela_table *t, uint32_t s, vela_entry *e)
{
    vela_taglink *tl = vela_tags_of(e);
    for (uint32_t i = 0; i < e->ntags; i++) {
        if (tl[i].prev)
            ((vela_taglink *)vela_at(t, tl[i].prev))->next = tl[i].next;
        else
            *vela_tagbucket(t, s, tl[i].tag) = tl[i].next;
        if (tl[i].next)
            ((vela_taglink *)vela_at(t, tl[i].next))->prev = tl[i].prev;
        tl[i].next = tl[i].prev = 0;
    }
}

/* ---- removal ------------------------------------------------------------------- */

/* Unlink the entry `ref` whose predecessor link is *pred, and free it; a caller
 * without the heap lock gives a small block to the stripe's arena instead (no
 * heap lock). Stripe locked, inside a write. Returns the ref of the free block
 * it became part of, or of the spare block it became: nonzero when removed. */
static uint32_t remove_at(vela_table *t, uint32_t s, uint32_t *pred, uint32_t ref, int heap_held,
                          vela_err *err)
{
    vela_stripe *st = &t->stripes[s];
    vela_block *b = blk(t, ref);
    vela_entry *e = vela_entry_of(b);
    st->pending[1] = ref;
    __atomic_store_n(pred, e->next, __ATOMIC_RELEASE);
    vela_tags_unlink(t, s, e);
    st->entries--;
    st->tombstones -= e->codec == VELA_CODEC_TOMBSTONE;
    st->bytes -= vela_block_size(b);
    uint32_t freed = 0;
    if (!heap_held && vela_arena_keep(t, s, ref)) {
        st->pending[1] = 0;
        return ref;
    }
    if (!heap_held && (*err = vela_heap_lock(t)) != VELA_OK)
        return 0; /* stays in pending: the block leaks rather than breaks */
    freed = vela_heap_free(t, ref);
    if (!heap_held)
        vela_heap_unlock(t);
    st->pending[1] = 0;
    return freed;
}

/* Predecessor link of entry `ref` in its bucket chain, or NULL. */
static uint32_t *pred_of(vela_table *t, uint32_t s, uint32_t ref)
{
    vela_entry *e = vela_entry_of(blk(t, ref));
    uint32_t *link = vela_bucket(t, s, e->hash);
    while (*link && *link != ref)
        link = &vela_entry_of(blk(t, *link))->next;
    return *link ? link : NULL;
}

uint32_t vela_remove_entry(vela_table *t, uint32_t s, uint32_t ref, int heap_held, vela_err *err)
{
    uint32_t *pred = pred_of(t, s, ref);
    if (!pred)
        return 0;
    vela_write_begin(t, s);
    uint32_t freed = remove_at(t, s, pred, ref, heap_held, err);
    vela_write_end(t, s);
    return freed;
}

/* ---- lookup --------------------------------------------------------------------- */

uint32_t vela_find(vela_table *t, uint32_t s, const vela_key *k, vela_err *err)
{
    uint32_t ref = vela_find_any(t, s, k, err);
    return ref && vela_entry_of(blk(t, ref))->codec == VELA_CODEC_TOMBSTONE ? 0 : ref;
}

/* The key's entry in stripe s (locked), expired or not, without reclaiming. */
static uint32_t entry_of_key(vela_table *t, uint32_t s, const vela_key *k)
{
    for (uint32_t ref = *vela_bucket(t, s, k->hash); ref;) {
        vela_entry *e = vela_entry_of(blk(t, ref));
        if (e->hash == k->hash && e->key_len == k->len && memcmp(vela_key_of(e), k->bytes, k->len) == 0)
            return ref;
        ref = e->next;
    }
    return 0;
}

uint32_t vela_find_any(vela_table *t, uint32_t s, const vela_key *k, vela_err *err)
{
    uint32_t *link = vela_bucket(t, s, k->hash);
    for (uint32_t ref = *link; ref; ref = *link) {
        vela_entry *e = vela_entry_of(blk(t, ref));
        if (e->hash == k->hash && e->key_len == k->len && memcmp(vela_key_of(e), k->bytes, k->len) == 0) {
            if (e->expire_at && vela_is_expired(t, e, 0)) {
                int tombstone = e->codec == VELA_CODEC_TOMBSTONE;
                vela_write_begin(t, s);
                remove_at(t, s, link, ref, 0, err);
                vela_write_end(t, s);
                if (*err == VELA_OK && !tombstone)
                    VELA_COUNT(t, VELA_STAT_EXPIRATIONS);
                return 0;
            }
            return ref;
        }
        link = &e->next;
    }
    return 0;
}

/* ---- put --------------------------------------------------------------------------- */

static void fill_entry(vela_table *t, vela_block *b, const vela_put_args *a, uint32_t next)
{
    vela_entry *e = vela_entry_of(b);
    e->hash = a->key->hash;
    e->next = next;
    e->value_len = (uint32_t)a->value_len;
    e->expire_at = a->expire_at;
    e->version = a->version ? a->version : vela_next_version(t);
    if (a->version_out)
        *a->version_out = e->version;
    e->key_len = (uint16_t)a->key->len;
    e->codec = a->codec;
    e->ntags = (uint8_t)a->ntags;
    vela_taglink *tl = vela_tags_of(e);
    for (size_t i = 0; i < a->ntags; i++) {
        tl[i].tag = (a->tags[i] & VELA_TAG_MASK) | i;
        tl[i].next = tl[i].prev = 0;
    }
    memcpy(vela_key_of(e), a->key->bytes, a->key->len);
    if (a->value_len)
        memcpy(vela_value_of(e), a->value, a->value_len);
    e->check = vela_entry_checksum(e);
    /* CLOCK: a new entry has no reference yet (a read gives it its second
     * chance); under lfu it starts with a count of 1 so it survives one aging. */
    b->access = t->hdr->eviction == VELA_EVICT_LFU ? 1 : 0;
}

/* The heap's part of a put, under one hold of its lock (left held in
 * *heap_held): room for max_size, the block (evicting if need be; the arenas'
 * spare memory is given back before the put is refused), and a refill of the
 * stripe's arena. */
static uint32_t alloc_from_heap(vela_table *t, uint32_t s, uint32_t size, int room_needed, int *heap_held,
                                vela_err *err)
{
    if ((*err = vela_heap_lock(t)) != VELA_OK)
        return 0;
    if (room_needed && !vela_evict_one(t, s)) {
        vela_heap_unlock(t);
        *err = vela_fail(VELA_EFULL, "the cache holds max_size=%llu entries and none may be evicted "
                         "(eviction_policy=ttl_only and none expired)", (unsigned long long)t->hdr->max_size);
        return 0;
    }
    uint32_t ref = vela_heap_alloc(t, size, s, 0);
    if (!ref) /* the clock hand gives spare blocks back as it passes them */
        ref = vela_evict_alloc(t, s, size, 0);
    if (!ref) { /* nothing could be evicted: every spare block in reach, then once more */
        vela_arena_reclaim(t, s);
        ref = vela_heap_alloc(t, size, s, 0);
    }
    if (!ref) {
        vela_heap_unlock(t);
        *err = VELA_EFULL; /* message set by the evictor */
        return 0;
    }
    vela_arena_refill(t, s, size);
    *heap_held = 1;
    return ref;
}

vela_err vela_do_put(vela_table *t, uint32_t s, const vela_put_args *a)
{
    vela_stripe *st = &t->stripes[s];
    vela_err err = VELA_OK;
    uint64_t size = vela_entry_block_size(a->key->len, a->value_len, a->ntags);
    if (size == 0 || size > t->hdr->max_entry_size)
        return vela_fail(VELA_ETOOLARGE, "entry of %llu bytes (key %zu, value %zu, %zu tags) is larger "
                         "than max_entry_size (%llu bytes)", (unsigned long long)size, a->key->len,
                         a->value_len, a->ntags, (unsigned long long)t->hdr->max_entry_size);
    uint32_t old = vela_find_any(t, s, a->key, &err);
    if (err != VELA_OK)
        return err;
    if (old && a->only_if_absent && vela_entry_of(blk(t, old))->codec != VELA_CODEC_TOMBSTONE)
        return VELA_OK;

    /* The block: from the stripe's arena under the stripe lock alone, else from
     * the heap under one hold of its lock. */
    int heap_held = 0, room_needed = !old && t->hdr->max_size && vela_size(t) >= t->hdr->max_size;
    uint32_t ref = room_needed ? 0 : vela_arena_take(t, s, (uint32_t)size, 0);
    if (!ref && !(ref = alloc_from_heap(t, s, (uint32_t)size, room_needed, &heap_held, &err)))
        return err;

    /* Eviction may have removed the old entry: look again. */
    old = entry_of_key(t, s, a->key); /* expired or not: it is replaced */
    if (heap_held && (!old || vela_arena_would_keep(t, s, vela_block_size(blk(t, old))))) {
        vela_heap_unlock(t); /* the arena keeps the replaced block: no free */
        heap_held = 0;
    }
    vela_write_begin(t, s);
    vela_block *b = blk(t, ref);
    vela_debug_stall(1);
    uint32_t *link = old ? pred_of(t, s, old) : vela_bucket(t, s, a->key->hash);
    fill_entry(t, b, a, old ? vela_entry_of(blk(t, old))->next : *link);
    vela_debug_stall(2);
    if (old)
        st->pending[1] = old;
    __atomic_store_n(link, ref, __ATOMIC_RELEASE); /* publish */
    vela_debug_stall(3);
    vela_tags_link(t, s, vela_entry_of(b));
    st->entries++;
    st->tombstones += a->codec == VELA_CODEC_TOMBSTONE;
    st->bytes += vela_block_size(b);
    if (old) {
        vela_block *ob = blk(t, old);
        vela_tags_unlink(t, s, vela_entry_of(ob));
        st->entries--;
        st->tombstones -= vela_entry_of(ob)->codec == VELA_CODEC_TOMBSTONE;
        st->bytes -= vela_block_size(ob);
        if (!vela_arena_keep(t, s, old)) {
            /* Not held yet only when the put was served by the arena and the
             * replaced block is larger than what the arena keeps. */
            if (!heap_held && (err = vela_heap_lock(t)) == VELA_OK)
                heap_held = 1;
            if (heap_held)
                vela_heap_free(t, old);
        }
    }
    vela_write_end(t, s);
    if (heap_held)
        vela_heap_unlock(t);
    return err;
}

/* Put and, for a replicated cache, log it while the stripe is still locked. */
static vela_err put_logged(vela_table *t, uint32_t s, const vela_put_args *a)
{
    uint64_t version = 0;
    vela_put_args b = *a;
    b.version_out = &version;
    vela_err err = vela_do_put(t, s, &b);
    if (err == VELA_OK && version)
        vela_log_put(t, &b, version);
    return err;
}

vela_err vela_put(vela_table *t, const vela_put_args *a)
{
    uint32_t s = vela_stripe_of(t, a->key->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    err = put_logged(t, s, a);
    vela_stripe_unlock(t, s);
    if (err == VELA_OK)
        VELA_COUNT(t, VELA_STAT_WRITES);
    return err;
}

/* Copy the tags of entry e into tags[VELA_MAX_TAGS] (a copy of the entry made by a
 * read-modify-write keeps them); how many. */
static size_t tags_of_entry(vela_entry *e, uint64_t *tags)
{
    for (uint32_t i = 0; i < e->ntags; i++)
        tags[i] = vela_tags_of(e)[i].tag;
    return e->ntags;
}

/* Does `cond` hold for the live entry `ref` (0: none) of stripe s (locked)? */
static int cond_holds(vela_table *t, uint32_t ref, vela_put_cond cond, const vela_expected *x)
{
    if (cond == VELA_IF_ABSENT)
        return !ref;
    if (!ref)
        return 0;
    if (cond == VELA_IF_PRESENT)
        return 1;
    vela_entry *e = vela_entry_of(blk(t, ref));
    return e->codec == x->codec && e->value_len == x->value_len &&
           memcmp(vela_value_of(e), x->value, x->value_len) == 0;
}

/* The conditional put, stripe s locked. */
static vela_err do_put_if(vela_table *t, uint32_t s, const vela_put_args *a, vela_put_cond cond,
                          const vela_expected *x, int *stored)
{
    vela_err err = VELA_OK;
    uint32_t live = vela_find(t, s, a->key, &err);
    if (err != VELA_OK || !cond_holds(t, live, cond, x))
        return err;
    uint64_t tags[VELA_MAX_TAGS];
    vela_put_args b = *a;
    if (cond == VELA_IF_EQUAL) { /* the new value of the same entry: its tags stay */
        b.tags = tags;
        b.ntags = tags_of_entry(vela_entry_of(blk(t, live)), tags);
    }
    if ((err = put_logged(t, s, &b)) == VELA_OK)
        *stored = 1;
    return err;
}

vela_err vela_put_if(vela_table *t, const vela_put_args *a, vela_put_cond cond, const vela_expected *expected,
                     int *stored)
{
    uint32_t s = vela_stripe_of(t, a->key->hash);
    *stored = 0;
    if ((cond == VELA_IF_EQUAL) != (expected != NULL))
        return vela_fail(VELA_EINVAL, "a conditional put has an expected value for cas only");
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    /* The check and the put under one stripe lock: one caller of every process wins. */
    err = do_put_if(t, s, a, cond, expected, stored);
    vela_stripe_unlock(t, s);
    if (*stored)
        VELA_COUNT(t, VELA_STAT_WRITES);
    return err;
}

static int view_is(const vela_table *t, uint32_t view_seq)
{
    return __atomic_load_n(&t->cluster->seq, __ATOMIC_ACQUIRE) == view_seq;
}

vela_err vela_put_if_view(vela_table *t, const vela_put_args *a, uint32_t view_seq, int *done)
{
    uint32_t s = vela_stripe_of(t, a->key->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    *done = view_is(t, view_seq);
    if (*done) {
        uint64_t version = 0;
        vela_put_args b = *a;
        b.version_out = &version;
        if ((err = vela_do_put(t, s, &b)) == VELA_OK)
            vela_log_write(t, VELA_OP_PUT, b.key, b.codec, b.value, b.value_len, b.tags, b.ntags, version,
                           b.expire_at);
    }
    vela_stripe_unlock(t, s);
    if (*done && err == VELA_OK)
        VELA_COUNT(t, VELA_STAT_WRITES);
    return err;
}

vela_err vela_delete_if_view(vela_table *t, const vela_key *k, uint32_t view_seq, int *done, int *removed)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    *removed = 0;
    *done = view_is(t, view_seq);
    if (*done) {
        /* A tombstone, even when the key is not here: a copy of the key on the other
         * side of a network split, or in a restarted member's table, is older than
         * this delete and must not come back when the copies meet. The bridge sends
         * it to the backup (the log record), and handoffs carry it. */
        uint32_t ref = vela_find(t, s, k, &err);
        uint64_t version = vela_next_version(t);
        *removed = ref != 0;
        err = vela_do_tombstone(t, s, k, version);
        if (err != VELA_OK && ref) { /* no room for the tombstone: the delete itself still holds */
            err = VELA_OK;
            ref = vela_find(t, s, k, &err);
            if (ref)
                vela_remove_entry(t, s, ref, 0, &err);
        }
        if (err == VELA_OK)
            vela_log_write(t, VELA_OP_DELETE, k, 0, NULL, 0, NULL, 0, version, 0);
    }
    vela_stripe_unlock(t, s);
    if (*removed)
        VELA_COUNT(t, VELA_STAT_DELETES);
    return err;
}

int vela_delete(vela_table *t, const vela_key *k, vela_err *err)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    if ((*err = vela_stripe_lock(t, s)) != VELA_OK)
        return 0;
    uint32_t ref = vela_find(t, s, k, err);
    if (*err != VELA_OK) {
        ref = 0;
    } else if (t->hdr->topology == VELA_TOPOLOGY_REPLICATED) {
        /* A tombstone, even when the key is not here: its put may still be on its
         * way from another host, and this delete is newer than that put. */
        uint64_t version = vela_next_version(t);
        *err = vela_do_tombstone(t, s, k, version);
        vela_log_append(t, VELA_OP_DELETE, k, 0, NULL, 0, NULL, 0, version, 0);
    } else if (ref) {
        vela_remove_entry(t, s, ref, 0, err);
    }
    vela_stripe_unlock(t, s);
    if (ref)
        VELA_COUNT(t, VELA_STAT_DELETES);
    return ref != 0;
}

/* Remove every entry `doomed` picks, stripe by stripe; with `void_fills`, also
 * void the near-cache reservations of every stripe (a fill read before must not
 * land after). */
typedef int (*entry_pred)(const vela_entry *e, const void *ctx);

/* *removed: the entries removed; with live_only, only those a reader would have found
 * (a tombstone or an expired entry is no key of the cache). */
static vela_err remove_where(vela_table *t, entry_pred doomed, const void *ctx, int void_fills,
                             int live_only, uint64_t *removed)
{
    *removed = 0;
    int64_t now = vela_now(t);
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        vela_err err = vela_stripe_lock(t, s);
        if (err != VELA_OK)
            return err;
        if (void_fills)
            __atomic_add_fetch(&t->stripes[s].inval_seq, 1, __ATOMIC_RELEASE);
        if (t->stripes[s].entries && (err = vela_heap_lock(t)) == VELA_OK) {
            vela_write_begin(t, s);
            uint32_t *first = &t->buckets[(uint64_t)s * (t->bucket_mask + 1)];
            for (uint32_t i = 0; i <= t->bucket_mask; i++)
                for (uint32_t *link = &first[i]; *link;) {
                    if (!doomed(vela_entry_of(blk(t, *link)), ctx)) {
                        link = &vela_entry_of(blk(t, *link))->next;
                        continue;
                    }
                    const vela_entry *e = vela_entry_of(blk(t, *link));
                    *removed += !live_only || (e->codec != VELA_CODEC_TOMBSTONE && !vela_is_expired(t, e, now));
                    remove_at(t, s, link, *link, 1, &err);
                }
            vela_write_end(t, s);
            vela_heap_unlock(t);
        }
        vela_stripe_unlock(t, s);
        if (err != VELA_OK)
            return err;
    }
    return VELA_OK;
}

static int older_than(const vela_entry *e, const void *below)
{
    return e->version < *(const uint64_t *)below; /* newer ones were written after the flush */
}

vela_err vela_flush(vela_table *t, uint64_t below, uint64_t *removed)
{
    return remove_where(t, older_than, &below, 0, 1, removed);
}

typedef struct { uint32_t parts; const uint8_t *drop; } partition_set;

static int in_partitions(const vela_entry *e, const void *ctx)
{
    const partition_set *ps = ctx;
    return ps->drop[e->hash % ps->parts];
}

vela_err vela_drop_partitions(vela_table *t, uint32_t parts, const uint8_t *drop, uint64_t *removed)
{
    partition_set ps = {parts, drop};
    return remove_where(t, in_partitions, &ps, 1, 0, removed);
}

vela_err vela_invalidate_tag(vela_table *t, uint64_t tag, uint64_t below, uint64_t *removed)
{
    return vela_invalidate_tag_counted(t, tag, below, 0, NULL, removed);
}

/* A clustered table keeps what a tag invalidation removed as a tombstone with the
 * removed entry's version: a copy of the key older than that entry (the other side
 * of a healed split, a late handoff) must not come back where the newer one was
 * invalidated, whatever tags the older copy carries. The tombstone replaces the
 * entry in place (key copied out first: the put may reuse the block). */
static int tombstone_in_place(vela_table *t, uint32_t s, vela_entry *e, vela_err *err)
{
    uint8_t bytes[VELA_MAX_KEY];
    memcpy(bytes, vela_key_of(e), e->key_len);
    vela_key k = {.bytes = bytes, .len = e->key_len, .hash = e->hash};
    vela_err put = vela_do_tombstone(t, s, &k, e->version);
    if (put == VELA_OK)
        return 1;
    if (put != VELA_EFULL && put != VELA_ETOOLARGE) {
        *err = put;
        return 0;
    }
    uint32_t ref = entry_of_key(t, s, &k); /* no room: the invalidation itself still holds */
    if (ref)
        vela_remove_entry(t, s, ref, 0, err);
    return 1;
}

vela_err vela_invalidate_tag_counted(vela_table *t, uint64_t tag, uint64_t below, uint32_t parts,
                                     const uint8_t *counted, uint64_t *removed)
{
    *removed = 0;
    int64_t now = vela_now(t);
    int keep_tombstones = t->hdr->topology != VELA_TOPOLOGY_LOCAL;
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        uint32_t *head = vela_tagbucket(t, s, tag);
        if (!__atomic_load_n(head, __ATOMIC_RELAXED))
            continue; /* no tag of this bucket in the stripe */
        vela_err err = vela_stripe_lock(t, s);
        if (err != VELA_OK)
            return err;
        uint32_t link = *head;
        while (link && err == VELA_OK) {
            vela_taglink *tl = (vela_taglink *)vela_at(t, link);
            uint32_t next = tl->next;
            if ((tl->tag & VELA_TAG_MASK) == (tag & VELA_TAG_MASK)) {
                vela_entry *e = (vela_entry *)(tl - (tl->tag & 0xFF)) - 1;
                if (e->version < below) {
                    vela_taglink *mine = vela_tags_of(e);
                    /* Removing e unlinks all its tag links: step past them. */
                    while (next && (vela_taglink *)vela_at(t, next) >= mine &&
                           (vela_taglink *)vela_at(t, next) < mine + e->ntags)
                        next = ((vela_taglink *)vela_at(t, next))->next;
                    int live = !vela_is_expired(t, e, now);
                    int owned = !counted || counted[e->hash % parts];
                    if (live && keep_tombstones) {
                        /* The put may evict and reshape the chain: walk it again from
                         * its head (the tombstone has no tags: it is not met again). */
                        if (tombstone_in_place(t, s, e, &err))
                            next = *head;
                    } else {
                        vela_remove_entry(t, s, vela_ref(t, (vela_block *)e - 1), 0, &err);
                    }
                    if (live && owned)
                        (*removed)++;
                    else if (!live)
                        VELA_COUNT(t, VELA_STAT_EXPIRATIONS);
                }
            }
            link = next;
        }
        vela_stripe_unlock(t, s);
        if (err != VELA_OK)
            return err; /* the entries removed so far stay removed */
    }
    if (t->stats_enabled)
        vela_count(t, VELA_STAT_INVALIDATIONS, *removed);
    return VELA_OK;
}

vela_err vela_do_tombstone(vela_table *t, uint32_t s, const vela_key *k, uint64_t version)
{
    vela_put_args a = {.key = k, .value = NULL, .value_len = 0, .codec = VELA_CODEC_TOMBSTONE,
                       .expire_at = vela_now(t) + VELA_TOMBSTONE_TTL_NS, .version = version};
    return vela_do_put(t, s, &a);
}

/* ---- read-modify-write: copy the entry with changes, publish the copy ------------ */

vela_err vela_touch(vela_table *t, const vela_key *k, int64_t expire_at, int *found)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    uint8_t stackbuf[512], *buf = stackbuf;
    uint32_t ref = vela_find(t, s, k, &err);
    *found = ref != 0;
    if (!ref)
        goto unlock;
    vela_entry *e = vela_entry_of(blk(t, ref));
    uint64_t tags[VELA_MAX_TAGS];
    size_t ntags = tags_of_entry(e, tags);
    /* The copy needs the bytes while the old entry may move: copy out first. */
    size_t vlen = e->value_len;
    if (vlen > sizeof stackbuf && !(buf = malloc(vlen))) {
        err = vela_fail(VELA_ESYS, "out of process memory copying a %zu-byte value", vlen);
        goto unlock;
    }
    memcpy(buf, vela_value_of(e), vlen);
    vela_put_args a = {.key = k, .value = buf, .value_len = vlen, .codec = e->codec,
                       .expire_at = expire_at, .tags = tags, .ntags = ntags};
    err = put_logged(t, s, &a);
unlock:
    vela_stripe_unlock(t, s);
    if (buf && buf != stackbuf)
        free(buf);
    return err;
}

vela_err vela_ttl(vela_table *t, const vela_key *k, int64_t *remaining, int *found)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    uint32_t ref = vela_find(t, s, k, &err);
    *found = ref != 0;
    if (ref) {
        vela_entry *e = vela_entry_of(blk(t, ref));
        *remaining = e->expire_at ? e->expire_at - vela_now(t) : -1;
        if (*remaining < 0 && e->expire_at)
            *remaining = 0;
    }
    vela_stripe_unlock(t, s);
    return err;
}

vela_err vela_incr(vela_table *t, const vela_key *k, int64_t delta, int64_t initial, int64_t expire_at,
                   int64_t *result)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    int64_t value = initial;
    uint64_t tags[VELA_MAX_TAGS];
    vela_put_args a = {.key = k, .codec = VELA_CODEC_INT, .expire_at = expire_at, .tags = tags};
    uint32_t ref = vela_find(t, s, k, &err);
    if (err != VELA_OK)
        goto unlock;
    if (ref) {
        vela_entry *e = vela_entry_of(blk(t, ref));
        if (e->codec != VELA_CODEC_INT || e->value_len != 8) {
            err = vela_fail(VELA_ENOTINT, "the value stored under this key is not an integer");
            goto unlock;
        }
        memcpy(&value, vela_value_of(e), 8);
        a.expire_at = e->expire_at; /* an existing counter keeps its expiry */
        a.ntags = tags_of_entry(e, tags);
    }
    if (__builtin_add_overflow(value, delta, &value)) {
        err = vela_fail(VELA_EOVERFLOW, "the counter would leave the signed 64-bit range");
        goto unlock;
    }
    a.value = (const uint8_t *)&value;
    a.value_len = 8;
    err = put_logged(t, s, &a);
    *result = value;
unlock:
    vela_stripe_unlock(t, s);
    if (err == VELA_OK)
        VELA_COUNT(t, VELA_STAT_WRITES);
    return err;
}

vela_err vela_flush_logged(vela_table *t, uint64_t *removed, uint64_t *version)
{
    *version = vela_next_version(t);
    vela_err err = vela_flush(t, *version, removed);
    if (err == VELA_OK)
        vela_log_append(t, VELA_OP_FLUSH, NULL, 0, NULL, 0, NULL, 0, *version, 0);
    return err;
}

vela_err vela_invalidate_tag_logged(vela_table *t, uint64_t tag, uint64_t *removed, uint64_t *version)
{
    *version = vela_next_version(t);
    vela_err err = vela_invalidate_tag(t, tag, *version, removed);
    if (err == VELA_OK)
        vela_log_append(t, VELA_OP_TAG, NULL, 0, NULL, 0, &tag, 1, *version, 0);
    return err;
}

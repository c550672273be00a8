/*
 * read.c -- lock-free lookups: the stripe's write sequence used as a seqlock.
 *
 * Writers make the sequence odd before they touch a chain and even after
 * (table.c); a reader notes an even sequence, walks the chain and copies
 * what it needs, then checks the sequence is unchanged. Between the two
 * reads the memory it looked at may have been freed and reused, so every
 * offset and length is bounds-checked before use and the copy is thrown away
 * if the sequence moved. A read that would have to write (an expired entry
 * to reclaim, an access mark to set) returns VELA_READ_LOCKED and the caller
 * takes the stripe lock instead: a lock-free reader never stores into the
 * segment, so it cannot scribble on memory that changed hands.
 */
#include "vela.h"

uint32_t vela_read_begin(const vela_table *t, uint32_t s)
{
    return __atomic_load_n(&t->stripes[s].seq, __ATOMIC_ACQUIRE);
}

int vela_read_valid(const vela_table *t, uint32_t s, uint32_t seq)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(&t->stripes[s].seq, __ATOMIC_RELAXED) == seq;
}

#define ONCE(x) __atomic_load_n(&(x), __ATOMIC_RELAXED) /* read a field exactly once */

vela_read_result vela_find_unlocked(const vela_table *t, uint32_t s, const vela_key *k, vela_view *out)
{
    const uint64_t heap_start = t->hdr->heap_off, heap_end = t->hdr->heap_end;
    const uint64_t max_entry = t->hdr->max_entry_size;
    uint32_t ref = ONCE(*vela_bucket(t, s, k->hash));
    for (uint32_t steps = 0; ref; steps++) {
        uint64_t off = (uint64_t)ref << 3;
        if (off < heap_start || off + VELA_ENTRY_OVERHEAD > heap_end || steps > (1u << 20))
            return VELA_READ_RETRY; /* a stale link: the sequence will have moved */
        vela_block *b = blk(t, ref);
        vela_entry *e = (vela_entry *)(b + 1);
        /* Every field is read once into a local and checked before use: the
         * entry may change between two reads of the same field. */
        uint64_t hash = ONCE(e->hash);
        uint16_t key_len = ONCE(e->key_len);
        uint32_t next = ONCE(e->next);
        if (hash == k->hash && key_len == k->len) {
            uint8_t ntags = ONCE(e->ntags), codec = ONCE(e->codec);
            uint32_t value_len = ONCE(e->value_len);
            int64_t expire_at = ONCE(e->expire_at);
            uint64_t key_off = off + VELA_ENTRY_OVERHEAD + (uint64_t)ntags * sizeof(vela_taglink);
            if (ntags > VELA_MAX_TAGS || codec >= VELA_CODEC_COUNT || value_len > max_entry ||
                key_off + key_len + value_len > heap_end)
                return VELA_READ_RETRY;
            const uint8_t *key = t->base + key_off;
            if (memcmp(key, k->bytes, k->len) == 0) {
                if (codec == VELA_CODEC_TOMBSTONE) {
                    out->ref = 0;
                    return VELA_READ_ABSENT; /* a delete remembered for replication */
                }
                if ((expire_at && vela_now(t) >= expire_at) || vela_access_due(t, ONCE(b->access)))
                    return VELA_READ_LOCKED; /* needs a store: take the lock */
                out->ref = ref;
                out->codec = codec;
                out->value = key + key_len;
                out->value_len = value_len;
                out->version = ONCE(e->version);
                return VELA_READ_FOUND;
            }
        }
        ref = next;
    }
    out->ref = 0;
    return VELA_READ_ABSENT;
}

static int copy_entry(void *ctx, vela_entry *e, int64_t now)
{
    const vela_reader *reader = ctx;
    (void)now;
    return reader->copy(reader->ctx, e->codec, vela_value_of(e), e->value_len);
}

vela_err vela_read_locked(vela_table *t, uint32_t ref, const vela_reader *reader)
{
    vela_block *b = blk(t, ref);
    vela_mark_access(t, b);
    return copy_entry((void *)reader, vela_entry_of(b), 0) < 0 ? VELA_ECALLER : VELA_OK;
}

/* Lock-free attempts before a lookup takes the stripe lock: enough to ride out
 * a write or two, few enough that a busy stripe costs little. */
#define LOCK_FREE_ATTEMPTS 3

/* The locked path of a lookup: copy the value out (reader) and/or note its version. */
typedef struct locked_look {
    const vela_reader *reader;
    uint64_t *version;
} locked_look;

static int look_locked(void *ctx, vela_entry *e, int64_t now)
{
    const locked_look *look = ctx;
    if (look->version)
        *look->version = e->version;
    return look->reader ? copy_entry((void *)look->reader, e, now) : 0;
}

/* vela_lookup, also giving the found entry's version (0 when none is found). */
static vela_err lookup(vela_table *t, const vela_key *k, const vela_reader *reader, int *found, uint64_t *version)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_view view;
    for (int attempt = 0; attempt < LOCK_FREE_ATTEMPTS; attempt++) {
        uint32_t seq = vela_read_begin(t, s);
        if (seq & 1)
            continue;
        vela_read_result r = vela_find_unlocked(t, s, k, &view);
        if (r == VELA_READ_LOCKED)
            break;
        if (r == VELA_READ_RETRY)
            continue;
        if (r == VELA_READ_ABSENT || !reader) {
            if (vela_read_valid(t, s, seq)) {
                *found = r == VELA_READ_FOUND;
                if (version)
                    *version = *found ? view.version : 0;
                return VELA_OK;
            }
            continue;
        }
        int copied = reader->copy(reader->ctx, view.codec, view.value, view.value_len);
        if (!vela_read_valid(t, s, seq)) { /* torn copy: throw it away */
            reader->drop(reader->ctx, copied);
            continue;
        }
        if (copied < 0)
            return VELA_ECALLER;
        *found = 1;
        if (version)
            *version = view.version;
        return VELA_OK;
    }
    /* expired (to reclaim) or an access mark due: the locked path does both */
    locked_look look = {reader, version};
    if (version)
        *version = 0;
    return vela_with_entry(t, k, reader || version ? look_locked : NULL, &look, found);
}

vela_err vela_lookup(vela_table *t, const vela_key *k, const vela_reader *reader, int *found)
{
    return lookup(t, k, reader, found, NULL);
}

vela_err vela_lookup_versioned(vela_table *t, const vela_key *k, const vela_reader *reader, int *found,
                               uint64_t *version)
{
    return lookup(t, k, reader, found, version);
}

vela_err vela_version_of(vela_table *t, const vela_key *k, uint64_t *version)
{
    int found = 0;
    return lookup(t, k, NULL, &found, version);
}

vela_err vela_with_entry(vela_table *t, const vela_key *k, vela_scan_fn fn, void *ctx, int *found)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return err;
    uint32_t ref = vela_find(t, s, k, &err);
    if (ref && fn) {
        vela_block *b = blk(t, ref);
        vela_mark_access(t, b);
        if (fn(ctx, vela_entry_of(b), vela_now(t)) < 0)
            err = VELA_ECALLER;
    }
    vela_stripe_unlock(t, s);
    *found = ref != 0;
    return err;
}

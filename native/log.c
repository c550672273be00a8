/*
 * log.c -- versions and the change log of a replicated cache.
 *
 * Versions are hybrid logical clocks: wall-clock milliseconds since 2020 in
 * the top 44 bits, a counter, and the host's node id in the low 12 bits, so
 * every host orders every write the same way (last writer wins) and a host
 * that has seen version v only issues versions above it.
 *
 * The change log is a ring in the segment. A worker appends a record of each
 * change while it still holds the key's stripe lock (so records of one key
 * are in the order they were applied), under the log's own lock (order:
 * stripe -> log), and publishes it by advancing `log_head` with one store; a
 * worker killed half-way leaves an unpublished record that the next writer
 * overwrites. The bridge reads behind the head without a lock and checks
 * afterwards that writers did not lap it (vela_log_read). Workers never
 * wait for the bridge: a full ring overwrites what the bridge has not read,
 * and the bridge, seeing that, resyncs its peers from a snapshot.
 */
#include <time.h>

#include "vela.h"

#define EPOCH_2020_MS 1577836800000LL

uint64_t vela_next_version(vela_table *t)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ms = (uint64_t)((int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 - EPOCH_2020_MS);
    uint64_t node = t->hdr->node_id & 0xFFF;
    uint64_t last = __atomic_load_n(&t->hdr->version_clock, __ATOMIC_RELAXED), next;
    do {
        uint64_t by_clock = ms << 20, by_order = (last & ~0xFFFull) + (1u << 12);
        next = (by_clock > by_order ? by_clock : by_order) | node;
    } while (!__atomic_compare_exchange_n(&t->hdr->version_clock, &last, next, 1, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    return next;
}

void vela_observe_version(vela_table *t, uint64_t version)
{
    uint64_t last = __atomic_load_n(&t->hdr->version_clock, __ATOMIC_RELAXED);
    while (last < version &&
           !__atomic_compare_exchange_n(&t->hdr->version_clock, &last, version, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
}

static void write_at(vela_table *t, uint64_t pos, const void *src, size_t n)
{
    memcpy(t->log + pos % t->hdr->log_size, src, n); /* records never straddle the end */
}

void vela_log_append(vela_table *t, uint8_t op, const vela_key *k, uint8_t codec, const uint8_t *value,
                     size_t value_len, const uint64_t *tags, size_t ntags, uint64_t version, int64_t expire_at)
{
    if (t->hdr->topology == VELA_TOPOLOGY_REPLICATED)
        vela_log_write(t, op, k, codec, value, value_len, tags, ntags, version, expire_at);
}

void vela_log_write(vela_table *t, uint8_t op, const vela_key *k, uint8_t codec, const uint8_t *value,
                    size_t value_len, const uint64_t *tags, size_t ntags, uint64_t version, int64_t expire_at)
{
    vela_header *h = t->hdr;
    if (h->log_size == 0)
        return;
    size_t key_len = k ? k->len : 0;
    uint64_t len = (sizeof(vela_log_record) + ntags * 8 + key_len + value_len + 7) & ~7ull;
    if (len > h->log_size / 4) {
        __atomic_add_fetch(&h->log_dropped, 1, __ATOMIC_RELEASE);
        return;
    }
    if (vela_log_lock(t) != VELA_OK) {
        __atomic_add_fetch(&h->log_dropped, 1, __ATOMIC_RELEASE);
        return;
    }
    uint64_t pos = h->log_head, room = h->log_size - pos % h->log_size;
    if (room < len) { /* pad to the end of the ring: records never wrap */
        vela_log_record pad = {.len = (uint32_t)room, .op = VELA_OP_PAD};
        write_at(t, pos, &pad, sizeof pad < room ? sizeof pad : room);
        pos += room;
    }
    vela_log_record r = {.len = (uint32_t)len, .op = op, .codec = codec, .key_len = (uint16_t)key_len,
                         .value_len = (uint32_t)value_len, .ntags = (uint8_t)ntags, .version = version,
                         .expire_at = expire_at};
    uint64_t at = pos;
    write_at(t, at, &r, sizeof r);
    at += sizeof r;
    if (ntags)
        write_at(t, at, tags, ntags * 8);
    at += ntags * 8;
    if (key_len)
        write_at(t, at, k->bytes, key_len);
    at += key_len;
    if (value_len)
        write_at(t, at, value, value_len);
    __atomic_store_n(&h->log_head, pos + len, __ATOMIC_RELEASE);
    vela_log_unlock(t);
}

void vela_log_put(vela_table *t, const vela_put_args *a, uint64_t version)
{
    vela_log_append(t, VELA_OP_PUT, a->key, a->codec, a->value, a->value_len, a->tags, a->ntags, version,
                    a->expire_at);
}

vela_err vela_log_read(vela_table *t, uint64_t *pos, uint32_t max, vela_log_fn fn, void *ctx, int *lapped)
{
    vela_header *h = t->hdr;
    uint64_t size = h->log_size, head = __atomic_load_n(&h->log_head, __ATOMIC_ACQUIRE);
    uint64_t p = *pos, start = p;
    *lapped = 0;
    if (!size || head - p > size - size / 4 || p > head) {
        /* No log; or a writer may be filling up to log_size / 4 past the head
         * and already overwrote what was not read. */
        *lapped = size != 0;
        *pos = head;
        return VELA_OK;
    }
    int64_t now = vela_now(t);
    for (uint32_t n = 0; p < head && n < max;) {
        vela_log_record r;
        memcpy(&r, t->log + p % size, sizeof r);
        if (r.len < 8 || r.len % 8 || r.len > size - p % size)
            break; /* lapped while reading: caught below */
        if (r.op != VELA_OP_PAD && (r.ntags > VELA_MAX_TAGS || r.len < sizeof r ||
                                    sizeof r + (uint64_t)r.ntags * 8 + r.key_len + r.value_len > r.len))
            break; /* the same */
        if (r.op != VELA_OP_PAD) {
            const uint8_t *body = t->log + p % size + sizeof r;
            uint64_t tags[VELA_MAX_TAGS];
            memcpy(tags, body, (size_t)r.ntags * 8);
            body += (size_t)r.ntags * 8;
            if (fn(ctx, &r, tags, body, body + r.key_len, now) < 0)
                return VELA_ECALLER;
            n++;
        }
        p += r.len;
    }
    /* Writers may have come round while we copied: what we read is good only
     * if the ring never came within a record's reach of where we started. */
    uint64_t head2 = __atomic_load_n(&h->log_head, __ATOMIC_ACQUIRE);
    *lapped = head2 - start > size - size / 4;
    *pos = p;
    return VELA_OK;
}

/*
 * cluster.c -- the cluster view: JSON the bridge writes into the segment for
 * the workers of its host, under a sequence (odd while it writes): a seqlock,
 * so workers read it without a lock and the bridge never waits for them.
 */
#include "vela.h"

vela_err vela_cluster_publish(vela_table *t, const char *json, size_t len)
{
    vela_cluster *c = t->cluster;
    if (len > sizeof c->json)
        return vela_fail(VELA_EINVAL, "the cluster view is bytes of at most %zu", sizeof c->json);
    __atomic_store_n(&c->seq, c->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(c->json, json, len);
    c->len = (uint32_t)len;
    __atomic_store_n(&c->seq, c->seq + 1, __ATOMIC_RELEASE);
    return VELA_OK;
}

/* Attempts before a reader settles for "no view": a view is written in
 * microseconds, so only a bridge stopped mid-write exhausts them. */
#define READ_ATTEMPTS 100

size_t vela_cluster_read(const vela_table *t, char out[VELA_CLUSTER_BYTES])
{
    const vela_cluster *c = t->cluster;
    for (int attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
        uint32_t seq = __atomic_load_n(&c->seq, __ATOMIC_ACQUIRE);
        if (seq & 1)
            continue;
        uint32_t len = c->len <= sizeof c->json ? c->len : 0; /* a torn length: none */
        memcpy(out, c->json, len);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&c->seq, __ATOMIC_RELAXED) == seq)
            return len;
    }
    return 0;
}

uint32_t vela_cluster_seq(const vela_table *t)
{
    return __atomic_load_n(&t->cluster->seq, __ATOMIC_ACQUIRE);
}

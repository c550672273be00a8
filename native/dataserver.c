/*
 * dataserver.c -- the bridge's data port on a native thread; see dataserver.h.
 *
 * One mutex guards the connections, the queue to Python and the caches: the
 * thread holds it while it handles one connection's event, the Python loop
 * while it takes requests or queues a reply (it writes at once when it can).
 * The thread never takes the GIL.
 */
#define _GNU_SOURCE
#include "dataserver.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "msgpack.h"
#include "sha256.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

#define HEADER 5                /* u32 payload length | u8 MAC length */
#define REQUEST_HEADER (HEADER + 16) /* ... | the header tag */
#define RECV_BYTES (64 << 10)
#define CONN_FD_BITS 24         /* a connection's id: a sequence number above its descriptor */
/* Bytes of requests waiting for the Python loop past which the thread stops reading
 * until the loop takes them (a flood of requests it cannot answer itself must not
 * grow the bridge without bound: the loop's own pace holds them back in the sockets). */
#define MAX_QUEUED (64u << 20)

typedef struct {
    int fd;
    uint64_t id;
    uint64_t number; /* of the next request */
    uint8_t nonce[VELA_DS_NONCE];
    vela_buf in, out;
    int want_out;    /* EPOLLOUT asked for */
} conn_t;

typedef struct {
    char *name;
    vela_table *t;
    uint32_t parts;
    uint8_t *servable;
    uint64_t served;
} cache_t;

struct vela_dataserver {
    pthread_mutex_t lock;
    pthread_t thread;
    int started, stopping;
    int listen_fd, epoll_fd, wake_fd, notify_fd, random_fd;
    uint32_t max_conns, max_request, nconns;
    conn_t **by_fd;
    size_t by_fd_len;
    uint64_t next_seq;
    int has_secret;
    vela_hmac_key key;
    uint32_t node_id, protocol; /* (protocol: the messages' version, protocol.py's) */
    uint64_t incarnation, sent;
    uint64_t serve_until; /* CLOCK_MONOTONIC ns (atomic: renewed without the lock) */
    uint64_t epoch;       /* the partition table's (atomic, as serve_until) */
    cache_t *caches; /* (one per partitioned cache of the bridge) */
    int ncaches;
    vela_ds_item *head, *tail;
    size_t queued;        /* bytes of the items in it */
    pthread_cond_t taken; /* signalled when the Python loop takes them */
    uint64_t counters[VELA_DS_COUNTERS];
    vela_buf scratch; /* a reply being built */
};

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- connections ------------------------------------------------------------------ */

static void context_of(const conn_t *c, uint8_t out[VELA_DS_CONTEXT])
{
    memcpy(out, c->nonce, VELA_DS_NONCE);
    for (int i = 0; i < 8; i++)
        out[VELA_DS_NONCE + i] = (uint8_t)(c->number >> (56 - 8 * i));
}

static void put_header(vela_buf *b, uint32_t len, uint8_t maclen)
{
    uint8_t h[HEADER] = {(uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len, maclen};
    vela_buf_put(b, h, HEADER);
}

static void queue(vela_dataserver *ds, vela_ds_item *item)
{
    item->next = NULL;
    ds->queued += sizeof *item + item->mac_len + item->payload_len;
    int was_empty = ds->head == NULL;
    if (ds->tail)
        ds->tail->next = item;
    else
        ds->head = item;
    ds->tail = item;
    if (was_empty) {
        uint64_t one = 1;
        ssize_t rc = write(ds->notify_fd, &one, sizeof one);
        (void)rc; /* (an eventfd at its maximum is readable anyway) */
    }
}

static void watch(vela_dataserver *ds, conn_t *c, int out)
{
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u64 = c->id};
    epoll_ctl(ds->epoll_fd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

static void close_conn(vela_dataserver *ds, conn_t *c)
{
    epoll_ctl(ds->epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    ds->by_fd[c->fd] = NULL;
    ds->nconns--;
    vela_ds_item *item = calloc(1, sizeof *item);
    if (item) { /* (its leases die with it: the Python loop releases them) */
        item->kind = VELA_DS_CLOSED;
        item->conn = c->id;
        queue(ds, item);
    }
    vela_buf_free(&c->in);
    vela_buf_free(&c->out);
    free(c);
}

/* Sends what is queued; 0, or -1 when the connection was closed. */
static int flush(vela_dataserver *ds, conn_t *c)
{
    size_t done = 0;
    while (done < c->out.len) {
        ssize_t n = send(c->fd, c->out.p + done, c->out.len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            done += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            close_conn(ds, c);
            return -1;
        }
    }
    memmove(c->out.p, c->out.p + done, c->out.len - done);
    c->out.len -= done;
    if ((c->out.len > 0) != c->want_out)
        watch(ds, c, c->out.len > 0);
    return 0;
}

static conn_t *conn_of(vela_dataserver *ds, uint64_t id)
{
    size_t fd = (size_t)(id & ((1u << CONN_FD_BITS) - 1));
    conn_t *c = fd < ds->by_fd_len ? ds->by_fd[fd] : NULL;
    return c && c->id == id ? c : NULL;
}

static void accept_all(vela_dataserver *ds)
{
    for (int i = 0; i < 64; i++) {
        int fd = accept4(ds->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN, or out of descriptors: the bridge goes on */
        conn_t *c = NULL;
        if (ds->nconns >= ds->max_conns || fd >= (1 << CONN_FD_BITS) || !(c = calloc(1, sizeof *c))) {
            close(fd);
            ds->counters[VELA_DS_MALFORMED]++;
            continue;
        }
        if ((size_t)fd >= ds->by_fd_len) {
            size_t len = (size_t)fd * 2 + 64;
            conn_t **by_fd = realloc(ds->by_fd, len * sizeof *by_fd);
            if (!by_fd) {
                close(fd);
                free(c);
                continue;
            }
            memset(by_fd + ds->by_fd_len, 0, (len - ds->by_fd_len) * sizeof *by_fd);
            ds->by_fd = by_fd, ds->by_fd_len = len;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        c->id = ++ds->next_seq << CONN_FD_BITS | (uint64_t)fd;
        c->number = 1;
        if (read(ds->random_fd, c->nonce, sizeof c->nonce) != (ssize_t)sizeof c->nonce) {
            close(fd);
            free(c);
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = c->id};
        if (epoll_ctl(ds->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
            continue;
        }
        ds->by_fd[fd] = c;
        ds->nconns++;
        put_header(&c->out, VELA_DS_NONCE, 0); /* the challenge */
        vela_buf_put(&c->out, c->nonce, VELA_DS_NONCE);
        flush(ds, c);
    }
}

/* ---- the native get --------------------------------------------------------------- */

typedef struct {
    vela_buf *value;
    int codec;
    int64_t remaining;
    uint64_t tags[VELA_MAX_TAGS];
    uint32_t ntags;
} found_t;

static int copy_entry(void *ctx, vela_entry *e, int64_t now)
{
    found_t *f = ctx;
    f->value->len = 0;
    vela_buf_put(f->value, vela_value_of(e), e->value_len);
    f->codec = e->codec;
    f->remaining = !e->expire_at ? 0 : e->expire_at > now ? e->expire_at - now : -1;
    f->ntags = e->ntags;
    for (uint32_t i = 0; i < e->ntags; i++)
        f->tags[i] = vela_tags_of(e)[i].tag & VELA_TAG_MASK;
    return f->value->failed ? -1 : 0;
}

static int is(const vela_mp_obj *o, const char *s)
{
    size_t n = strlen(s);
    return o->type == VELA_MP_STR && o->len == n && memcmp(o->data, s, n) == 0;
}

enum { F_T, F_V, F_INC, F_N, F_ID, F_C, F_E, F_FROM, F_OP, F_K, F_CLK, NFIELDS };
static const char *const FIELDS[NFIELDS] = {"t", "v", "inc", "n", "id", "c", "e", "from", "op", "k", "clk"};

/* The cache and key of a request that is exactly a worker's get (every field as
 * protocol.py checks it, nothing more); 0, or -1 for anything else. */
static int read_get(vela_dataserver *ds, const uint8_t *payload, uint32_t len, cache_t **cache,
                    vela_mp_obj *key, uint64_t *rid, uint64_t *clk)
{
    vela_mp_reader r = {payload, payload + len};
    vela_mp_obj m, k, v[NFIELDS];
    unsigned seen = 0;
    if (vela_mp_next(&r, &m) < 0 || m.type != VELA_MP_MAP)
        return -1;
    for (uint32_t i = 0; i < m.len; i++) {
        if (vela_mp_next(&r, &k) < 0)
            return -1;
        int f = 0;
        while (f < NFIELDS && !is(&k, FIELDS[f]))
            f++;
        if (f == NFIELDS || seen & (1u << f) || vela_mp_next(&r, &v[f]) < 0 || v[f].type == VELA_MP_ARRAY ||
            v[f].type == VELA_MP_MAP) /* (no field of a get is a container) */
            return -1;
        seen |= 1u << f;
    }
    if (r.p != r.end || (seen | (1u << F_CLK)) != (1u << NFIELDS) - 1)
        return -1;
    for (int f = F_V; f <= F_FROM; f++)
        if (f != F_C && v[f].type != VELA_MP_UINT)
            return -1;
    if (!is(&v[F_T], "req") || !is(&v[F_OP], "get") || v[F_V].u != ds->protocol || v[F_FROM].u > 4095 ||
        v[F_N].u < 1 || v[F_N].u > (1ull << 63) || v[F_ID].u > (1ull << 63) || v[F_E].u > (1ull << 63) ||
        v[F_K].type != VELA_MP_BIN || v[F_K].len < 1 || v[F_K].len > VELA_MAX_KEY || v[F_C].type != VELA_MP_STR)
        return -1;
    *clk = 0;
    if (seen & (1u << F_CLK)) {
        if (v[F_CLK].type != VELA_MP_UINT || v[F_CLK].u == 0)
            return -1;
        *clk = v[F_CLK].u;
    }
    for (int i = 0; i < ds->ncaches; i++) {
        cache_t *c = &ds->caches[i];
        if (strlen(c->name) == v[F_C].len && memcmp(c->name, v[F_C].data, v[F_C].len) == 0) {
            *cache = c;
            *key = v[F_K];
            *rid = v[F_ID].u;
            return 0;
        }
    }
    return -1;
}

/* Answers a request that is a get this member may serve from its table; 1 when
 * it did, 0 when the Python loop must. */
static int serve_get(vela_dataserver *ds, conn_t *c, const uint8_t ctx[VELA_DS_CONTEXT], const uint8_t *mac,
                     uint32_t maclen, const uint8_t *payload, uint32_t len)
{
    uint8_t want[VELA_SHA256_BYTES];
    if (ds->has_secret) { /* (a bad MAC is the Python loop's to count) */
        vela_hmac2(&ds->key, ctx, VELA_DS_CONTEXT, payload, len, want);
        if (maclen != VELA_SHA256_BYTES || !vela_equal_ct(mac, want, VELA_SHA256_BYTES))
            return 0;
    }
    if (monotonic_ns() >= __atomic_load_n(&ds->serve_until, __ATOMIC_ACQUIRE))
        return 0; /* the Python loop did not turn lately: it decides (it may start over) */
    cache_t *cache;
    vela_mp_obj k;
    uint64_t rid, clk;
    if (read_get(ds, payload, len, &cache, &k, &rid, &clk) < 0 || !cache->servable)
        return 0;
    vela_key key = {.bytes = k.data, .len = k.len, .hash = XXH3_64bits(k.data, k.len)};
    if (!cache->servable[key.hash % cache->parts])
        return 0;
    vela_table *t = cache->t;
    if (clk)
        vela_observe_version(t, clk);
    vela_buf value = {0};
    found_t f = {.value = &value};
    int found = 0;
    if (vela_with_entry(t, &key, copy_entry, &f, &found) != VELA_OK) {
        vela_buf_free(&value); /* (the Python loop answers with the error) */
        return 0;
    }
    VELA_COUNT(t, found ? VELA_STAT_HITS : VELA_STAT_MISSES);
    vela_buf *b = &ds->scratch;
    b->len = 0;
    vela_mp_map(b, found ? 12 : 9); /* (the fields below) */
    if (found) {
        vela_mp_str(b, "val"), vela_mp_bin(b, value.p, (uint32_t)value.len);
        vela_mp_str(b, "codec"), vela_mp_uint(b, (uint64_t)f.codec);
        vela_mp_str(b, "ttl"), vela_mp_int(b, f.remaining);
        vela_mp_str(b, "tags"), vela_mp_array(b, f.ntags);
        for (uint32_t i = 0; i < f.ntags; i++)
            vela_mp_uint(b, f.tags[i]);
    } else {
        vela_mp_str(b, "miss"), vela_mp_bool(b, 1);
    }
    vela_buf_free(&value);
    vela_mp_str(b, "ver"), vela_mp_uint(b, vela_next_version(t));
    vela_mp_str(b, "epoch"), vela_mp_uint(b, __atomic_load_n(&ds->epoch, __ATOMIC_RELAXED));
    vela_mp_str(b, "id"), vela_mp_uint(b, rid);
    vela_mp_str(b, "t"), vela_mp_str(b, "rep");
    vela_mp_str(b, "v"), vela_mp_uint(b, ds->protocol);
    vela_mp_str(b, "n"), vela_mp_uint(b, ++ds->sent);
    vela_mp_str(b, "from"), vela_mp_uint(b, ds->node_id);
    vela_mp_str(b, "inc"), vela_mp_uint(b, ds->incarnation);
    if (b->failed) {
        vela_buf_free(b);
        return 0;
    }
    uint8_t maclen_out = ds->has_secret ? VELA_SHA256_BYTES : 0;
    if (ds->has_secret)
        vela_hmac2(&ds->key, ctx, VELA_DS_CONTEXT, b->p, b->len, want);
    put_header(&c->out, (uint32_t)b->len, maclen_out);
    vela_buf_put(&c->out, want, maclen_out);
    vela_buf_put(&c->out, b->p, b->len);
    cache->served++;
    ds->counters[VELA_DS_SERVED]++;
    ds->counters[VELA_DS_BYTES_IN] += maclen + len;
    return 1;
}

/* ---- requests ----------------------------------------------------------------------- */

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Takes every complete request of c's input; 0, or -1 when c was closed (a frame
 * out of bounds or with a wrong tag: the stream cannot be trusted past it). */
static int take_requests(vela_dataserver *ds, conn_t *c)
{
    size_t pos = 0;
    while (c->in.len - pos >= REQUEST_HEADER) {
        const uint8_t *h = c->in.p + pos;
        uint32_t len = be32(h);
        uint8_t maclen = h[4];
        if (len > ds->max_request || maclen > 64) {
            ds->counters[VELA_DS_MALFORMED]++;
            close_conn(ds, c);
            return -1;
        }
        uint8_t ctx[VELA_DS_CONTEXT];
        context_of(c, ctx);
        if (ds->has_secret) {
            uint8_t tag[VELA_SHA256_BYTES];
            vela_hmac2(&ds->key, ctx, VELA_DS_CONTEXT, h, HEADER, tag);
            if (!vela_equal_ct(tag, h + HEADER, 16)) {
                ds->counters[VELA_DS_UNAUTHENTICATED]++;
                close_conn(ds, c);
                return -1;
            }
        }
        size_t end = pos + REQUEST_HEADER + maclen + len;
        if (c->in.len < end)
            break;
        const uint8_t *mac = h + REQUEST_HEADER, *payload = mac + maclen;
        c->number++;
        if (!serve_get(ds, c, ctx, mac, maclen, payload, len)) {
            vela_ds_item *item = malloc(sizeof *item + maclen + len);
            if (item) {
                item->kind = VELA_DS_REQUEST;
                item->conn = c->id;
                memcpy(item->context, ctx, VELA_DS_CONTEXT);
                item->mac_len = maclen, item->payload_len = len;
                memcpy(item->data, mac, maclen);
                memcpy(item->data + maclen, payload, len);
                queue(ds, item);
            }
        }
        pos = end;
    }
    memmove(c->in.p, c->in.p + pos, c->in.len - pos);
    c->in.len -= pos;
    return 0;
}

static void on_readable(vela_dataserver *ds, conn_t *c)
{
    for (;;) {
        if (vela_buf_reserve(&c->in, RECV_BYTES) < 0) {
            close_conn(ds, c);
            return;
        }
        ssize_t n = recv(c->fd, c->in.p + c->in.len, RECV_BYTES, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n <= 0) {
            close_conn(ds, c);
            return;
        }
        c->in.len += (size_t)n;
        if (take_requests(ds, c) < 0)
            return;
        if (n < RECV_BYTES || ds->queued > MAX_QUEUED)
            break; /* (level-triggered: what is left is reported again) */
    }
    if (c->out.len)
        flush(ds, c);
}

/* ---- the thread --------------------------------------------------------------------- */

static void *run(void *arg)
{
    vela_dataserver *ds = arg;
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ds->epoll_fd, evs, 64, -1);
        if (n < 0 && errno != EINTR)
            break;
        pthread_mutex_lock(&ds->lock);
        if (ds->stopping) {
            pthread_mutex_unlock(&ds->lock);
            break;
        }
        for (int i = 0; i < n; i++) {
            uint64_t id = evs[i].data.u64;
            if (id == 0) {
                accept_all(ds);
                continue;
            }
            if (id == 1) {
                uint64_t v;
                ssize_t rc = read(ds->wake_fd, &v, sizeof v);
                (void)rc;
                continue;
            }
            conn_t *c = conn_of(ds, id);
            if (!c)
                continue;
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                on_readable(ds, c);
            else if (evs[i].events & EPOLLOUT)
                flush(ds, c);
        }
        while (ds->queued > MAX_QUEUED && !ds->stopping)
            pthread_cond_wait(&ds->taken, &ds->lock);
        pthread_mutex_unlock(&ds->lock);
    }
    return NULL;
}

vela_dataserver *vela_ds_new(int listen_fd, const uint8_t *secret, size_t secret_len, uint32_t max_conns,
                             uint32_t max_request, uint32_t protocol)
{
    vela_dataserver *ds = calloc(1, sizeof *ds);
    if (!ds)
        return NULL;
    pthread_mutex_init(&ds->lock, NULL);
    pthread_cond_init(&ds->taken, NULL);
    ds->listen_fd = listen_fd;
    ds->max_conns = max_conns, ds->max_request = max_request, ds->protocol = protocol;
    ds->has_secret = secret_len > 0;
    vela_hmac_key_init(&ds->key, secret, secret_len);
    ds->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    ds->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ds->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ds->random_fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    struct epoll_event listen_ev = {.events = EPOLLIN, .data.u64 = 0}, wake_ev = {.events = EPOLLIN, .data.u64 = 1};
    if (ds->epoll_fd < 0 || ds->wake_fd < 0 || ds->notify_fd < 0 || ds->random_fd < 0 ||
        epoll_ctl(ds->epoll_fd, EPOLL_CTL_ADD, listen_fd, &listen_ev) < 0 ||
        epoll_ctl(ds->epoll_fd, EPOLL_CTL_ADD, ds->wake_fd, &wake_ev) < 0) {
        int saved = errno;
        vela_ds_free(ds);
        errno = saved;
        return NULL;
    }
    return ds;
}

int vela_ds_start(vela_dataserver *ds)
{
    int err = pthread_create(&ds->thread, NULL, run, ds);
    if (err) {
        errno = err;
        return -1;
    }
    ds->started = 1;
    return 0;
}

void vela_ds_free(vela_dataserver *ds)
{
    if (!ds)
        return;
    if (ds->started) {
        pthread_mutex_lock(&ds->lock);
        ds->stopping = 1;
        pthread_cond_signal(&ds->taken);
        pthread_mutex_unlock(&ds->lock);
        uint64_t one = 1;
        ssize_t rc = write(ds->wake_fd, &one, sizeof one);
        (void)rc;
        pthread_join(ds->thread, NULL);
    }
    for (size_t fd = 0; fd < ds->by_fd_len; fd++)
        if (ds->by_fd[fd])
            close_conn(ds, ds->by_fd[fd]);
    free(ds->by_fd);
    for (vela_ds_item *item = ds->head, *next; item; item = next) {
        next = item->next;
        free(item);
    }
    for (int i = 0; i < ds->ncaches; i++) {
        free(ds->caches[i].name);
        free(ds->caches[i].servable);
    }
    free(ds->caches);
    vela_buf_free(&ds->scratch);
    int fds[] = {ds->epoll_fd, ds->wake_fd, ds->notify_fd, ds->random_fd};
    for (size_t i = 0; i < sizeof fds / sizeof *fds; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    pthread_cond_destroy(&ds->taken);
    pthread_mutex_destroy(&ds->lock);
    free(ds);
}

int vela_ds_notify_fd(const vela_dataserver *ds)
{
    return ds->notify_fd;
}

vela_ds_item *vela_ds_take(vela_dataserver *ds)
{
    uint64_t v;
    ssize_t rc = read(ds->notify_fd, &v, sizeof v);
    (void)rc;
    pthread_mutex_lock(&ds->lock);
    vela_ds_item *items = ds->head;
    ds->head = ds->tail = NULL;
    ds->queued = 0;
    pthread_cond_signal(&ds->taken);
    pthread_mutex_unlock(&ds->lock);
    return items;
}

int vela_ds_send(vela_dataserver *ds, uint64_t conn, const uint8_t *data, size_t len)
{
    pthread_mutex_lock(&ds->lock);
    conn_t *c = conn_of(ds, conn);
    int rc = -1;
    if (c) {
        vela_buf_put(&c->out, data, len);
        rc = c->out.failed ? -1 : 0;
        if (rc < 0)
            close_conn(ds, c);
        else
            flush(ds, c);
    }
    pthread_mutex_unlock(&ds->lock);
    return rc;
}

void vela_ds_serve_for(vela_dataserver *ds, uint64_t ns, uint64_t epoch)
{
    __atomic_store_n(&ds->epoch, epoch, __ATOMIC_RELAXED);
    __atomic_store_n(&ds->serve_until, monotonic_ns() + ns, __ATOMIC_RELEASE);
}

void vela_ds_set_identity(vela_dataserver *ds, uint32_t node_id, uint64_t incarnation)
{
    pthread_mutex_lock(&ds->lock);
    ds->node_id = node_id, ds->incarnation = incarnation;
    pthread_mutex_unlock(&ds->lock);
}

int vela_ds_set_cache(vela_dataserver *ds, const char *name, vela_table *t, uint32_t parts,
                      const uint8_t *servable)
{
    uint8_t *flags = NULL;
    if (servable && parts && !(flags = malloc(parts)))
        return -1;
    if (flags)
        memcpy(flags, servable, parts);
    pthread_mutex_lock(&ds->lock);
    cache_t *c = NULL;
    for (int i = 0; i < ds->ncaches && !c; i++)
        if (strcmp(ds->caches[i].name, name) == 0)
            c = &ds->caches[i];
    if (!c) {
        cache_t *caches = realloc(ds->caches, (size_t)(ds->ncaches + 1) * sizeof *caches);
        if (caches) {
            ds->caches = caches;
            memset(&caches[ds->ncaches], 0, sizeof *caches);
            if ((caches[ds->ncaches].name = strdup(name)) != NULL)
                c = &caches[ds->ncaches++];
        }
    }
    if (c) {
        free(c->servable);
        c->t = t, c->parts = parts, c->servable = flags;
    }
    pthread_mutex_unlock(&ds->lock);
    if (!c) {
        free(flags);
        return -1;
    }
    return 0;
}

void vela_ds_counters(vela_dataserver *ds, uint64_t out[VELA_DS_COUNTERS])
{
    pthread_mutex_lock(&ds->lock);
    memcpy(out, ds->counters, sizeof ds->counters);
    pthread_mutex_unlock(&ds->lock);
}

uint64_t vela_ds_served(vela_dataserver *ds, const char *name)
{
    uint64_t n = 0;
    pthread_mutex_lock(&ds->lock);
    for (int i = 0; i < ds->ncaches; i++)
        if (strcmp(ds->caches[i].name, name) == 0)
            n = ds->caches[i].served;
    pthread_mutex_unlock(&ds->lock);
    return n;
}

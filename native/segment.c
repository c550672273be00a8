/*
 * segment.c -- create or attach a segment: race-safe initialisation, layout
 * validation, options that must agree, and process identity.
 *
 * Creation protocol: every opener takes flock(LOCK_EX) on the segment's fd.
 * Under it, a segment whose header says READY is validated and attached;
 * anything else (size 0, or a creator that died before setting READY) is
 * truncated, laid out and marked READY as the last store. flock is released
 * by the kernel when a process dies, so a crashed creator cannot block others.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

#include "vela.h"

static const char *const eviction_names[] = {"lru", "lfu", "ttl_only"};

int64_t vela_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t vela_now(const vela_table *t)
{
    struct timespec ts;
    clock_gettime(t->clock_id, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Start time of a running process; 0 when it is gone or a zombie (killed,
 * not yet reaped: it holds nothing any more). */
uint64_t vela_proc_start_time(uint32_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    /* The command name may hold spaces and parentheses: fields restart after
     * the last ')'. Field 3 (state) follows; start time is field 22. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X' || p[2] == 'x')
        return 0;
    p++;
    for (int field = 3; field < 22 && *p; field++) {
        while (*p == ' ')
            p++;
        while (*p && *p != ' ')
            p++;
    }
    return strtoull(p, NULL, 10);
}

int vela_proc_alive(uint32_t pid, uint64_t start)
{
    if (pid == 0)
        return 0;
    uint64_t now_start = vela_proc_start_time(pid);
    return now_start != 0 && (start == 0 || now_start == start);
}

uint64_t vela_header_checksum(const vela_header *h)
{
    return XXH3_64bits(h, offsetof(vela_header, header_check));
}

static uint64_t pow2_floor(uint64_t x)
{
    uint64_t p = 1;
    while (p * 2 <= x)
        p *= 2;
    return p;
}

static uint64_t pow2_ceil(uint64_t x)
{
    uint64_t p = 1;
    while (p < x)
        p *= 2;
    return p;
}

static uint64_t align_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) / a * a;
}

/* Lay out a new segment of `cap` bytes into hdr (zeroed memory). */
static vela_err lay_out(vela_header *hdr, const vela_options *o, uint64_t cap)
{
    uint64_t stripes = o->stripes > 0 ? (uint64_t)o->stripes : pow2_floor(cap / (256u << 10));
    if (o->stripes <= 0) {
        if (stripes < 16)
            stripes = 16;
        if (stripes > 256)
            stripes = 256;
    }
    if (stripes == 0 || (stripes & (stripes - 1)) || stripes > VELA_MAX_STRIPES)
        return vela_fail(VELA_EINVAL, "stripes must be a power of two from 1 to %d, not %llu",
                         VELA_MAX_STRIPES, (unsigned long long)stripes);
    uint64_t buckets = pow2_ceil(cap / 256 / stripes);
    if (buckets < 8)
        buckets = 8;
    uint64_t tagbuckets = buckets / 8 < 4 ? 4 : buckets / 8;

    hdr->magic = VELA_MAGIC;
    hdr->format = VELA_FORMAT;
    hdr->header_size = sizeof(vela_header);
    hdr->backend = (uint32_t)o->backend;
    hdr->eviction = o->eviction >= 0 ? (uint32_t)o->eviction : VELA_EVICT_LRU;
    hdr->stripes = (uint32_t)stripes;
    hdr->buckets = (uint32_t)buckets;
    hdr->tagbuckets = (uint32_t)tagbuckets;
    hdr->capacity = cap;
    hdr->max_size = o->max_size >= 0 ? (uint64_t)o->max_size : 0;

    uint64_t off = align_up(sizeof(vela_header), 4096);
    hdr->stripes_off = off;
    off = align_up(off + stripes * sizeof(vela_stripe), VELA_LINE);
    hdr->buckets_off = off;
    off = align_up(off + stripes * buckets * 4, VELA_LINE);
    hdr->tagbuckets_off = off;
    off = align_up(off + stripes * tagbuckets * 4, VELA_LINE);
    hdr->leases_off = off;
    off = align_up(off + stripes * VELA_LEASES_PER_STRIPE * sizeof(vela_lease), VELA_LINE);
    hdr->slots_off = off;
    off = align_up(off + VELA_STAT_SLOTS * sizeof(vela_slot), 4096);
    hdr->topology = o->topology > 0 ? (uint32_t)o->topology : 0; /* -1 (not given): local */
    hdr->log_off = off;
    hdr->log_size = 0;
    if (hdr->topology != VELA_TOPOLOGY_LOCAL) { /* partitioned: the writes made in owned partitions */
        uint64_t mes = o->max_entry_size > 0 ? (uint64_t)o->max_entry_size : cap / 64;
        uint64_t log = cap / 8 > 4 * mes + 65536 ? cap / 8 : 4 * mes + 65536;
        hdr->log_size = align_up(log, 4096);
    }
    off = align_up(off + hdr->log_size, 4096);
    hdr->cluster_off = off;
    off = align_up(off + sizeof(vela_cluster), 4096);
    hdr->heap_off = off;
    hdr->heap_end = cap & ~(uint64_t)7;
    if (off + (64u << 10) > cap)
        return vela_fail(VELA_EINVAL, "capacity of %llu bytes is too small for %llu stripes "
                         "(the index alone takes %llu bytes)", (unsigned long long)cap,
                         (unsigned long long)stripes, (unsigned long long)off);
    uint64_t heap = cap - off;
    uint64_t mes = o->max_entry_size > 0 ? (uint64_t)o->max_entry_size : cap / 64;
    if (mes > heap / 2)
        return vela_fail(VELA_EINVAL, "max_entry_size %llu is more than half of the %llu bytes "
                         "of entry memory", (unsigned long long)mes, (unsigned long long)heap);
    if (mes < 256)
        return vela_fail(VELA_EINVAL, "max_entry_size %llu is below the minimum of 256 bytes",
                         (unsigned long long)mes);
    hdr->max_entry_size = mes;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    hdr->created_ns = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    return VELA_OK;
}

static void bind_handle(vela_table *t, uint8_t *base, uint64_t size, int fd)
{
    vela_header *h = (vela_header *)base;
    t->base = base;
    t->size = size;
    t->fd = fd;
    t->hdr = h;
    t->stripes = (vela_stripe *)(base + h->stripes_off);
    t->buckets = (uint32_t *)(base + h->buckets_off);
    t->tagbuckets = (uint32_t *)(base + h->tagbuckets_off);
    t->slots = (vela_slot *)(base + h->slots_off);
    t->leases = (vela_lease *)(base + h->leases_off);
    t->log = base + h->log_off;
    t->cluster = (vela_cluster *)(base + h->cluster_off);
    t->stripe_mask = h->stripes - 1;
    t->bucket_mask = h->buckets - 1;
    t->tagbucket_mask = h->tagbuckets - 1;
    t->clock_id = h->backend == VELA_BACKEND_FILE ? CLOCK_REALTIME : CLOCK_MONOTONIC;
    t->stats_enabled = 1;
    t->lock_timeout_ns = 10LL * 1000000000LL;
}

static vela_err initialise(vela_table *t)
{
    vela_header *h = t->hdr;
    vela_err err;
    if ((err = vela_lock_init(&h->admin)) != VELA_OK)
        return err;
    if ((err = vela_lock_init(&h->heap.lock)) != VELA_OK)
        return err;
    if ((err = vela_lock_init(&h->log_lock)) != VELA_OK)
        return err;
    for (uint32_t s = 0; s < h->stripes; s++)
        if ((err = vela_lock_init(&t->stripes[s].lock)) != VELA_OK)
            return err;
    vela_heap_init(t);
    h->ready = VELA_READY;
    h->header_check = vela_header_checksum(h);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return VELA_OK;
}

/* Compare what the opener asked for with what the segment has. */
static vela_err check_agreement(const vela_header *h, const vela_options *o)
{
    char diff[400] = "";
    size_t n = 0;
#define DIFFER(name, want, have)                                                              \
    n += (size_t)snprintf(diff + n, n < sizeof diff ? sizeof diff - n : 0, "%s%s=%llu (segment has %llu)", \
                          n ? ", " : "", name, (unsigned long long)(want), (unsigned long long)(have))
    if (o->capacity >= 0 && (uint64_t)o->capacity != h->capacity)
        DIFFER("capacity", o->capacity, h->capacity);
    if (o->stripes >= 0 && (uint64_t)o->stripes != h->stripes)
        DIFFER("stripes", o->stripes, h->stripes);
    if (o->max_size >= 0 && (uint64_t)o->max_size != h->max_size)
        DIFFER("max_size", o->max_size, h->max_size);
    if (o->max_entry_size >= 0 && (uint64_t)o->max_entry_size != h->max_entry_size)
        DIFFER("max_entry_size", o->max_entry_size, h->max_entry_size);
#undef DIFFER
    if (o->eviction >= 0 && (uint64_t)o->eviction != h->eviction && h->eviction <= 2)
        n += (size_t)snprintf(diff + n, n < sizeof diff ? sizeof diff - n : 0,
                              "%seviction_policy=%s (segment has %s)", n ? ", " : "",
                              eviction_names[o->eviction], eviction_names[h->eviction]);
    if (o->topology >= 0 && (uint32_t)o->topology != h->topology)
        n += (size_t)snprintf(diff + n, n < sizeof diff ? sizeof diff - n : 0,
                              "%stopology=%s (segment is %s)", n ? ", " : "",
                              vela_topology_name((uint32_t)o->topology), vela_topology_name(h->topology));
    if ((uint32_t)o->backend != h->backend)
        n += (size_t)snprintf(diff + n, n < sizeof diff ? sizeof diff - n : 0,
                              "%sbackend differs", n ? ", " : "");
    if (n)
        return vela_fail(VELA_ELAYOUT, "the existing cache was made with other options: %s", diff);
    return VELA_OK;
}

static vela_err validate(const vela_header *h, uint64_t size)
{
    if (h->magic != VELA_MAGIC)
        return vela_fail(VELA_EFORMAT, "not a Vela segment, or one of the other byte order "
                         "(magic %016llx)", (unsigned long long)h->magic);
    if (h->format != VELA_FORMAT || h->header_size != sizeof(vela_header))
        return vela_fail(VELA_EFORMAT, "segment has layout format %u, this build reads format %u; "
                         "destroy it (vela.destroy) after the old workers stop", h->format, VELA_FORMAT);
    if (h->header_check != vela_header_checksum(h))
        return vela_fail(VELA_ECORRUPT, "segment header is damaged (checksum mismatch)");
    if (h->capacity != size)
        return vela_fail(VELA_ECORRUPT, "header says %llu bytes, the segment has %llu",
                         (unsigned long long)h->capacity, (unsigned long long)size);
    int ok = h->stripes && !(h->stripes & (h->stripes - 1)) && h->stripes <= VELA_MAX_STRIPES &&
             h->buckets && !(h->buckets & (h->buckets - 1)) && h->tagbuckets &&
             !(h->tagbuckets & (h->tagbuckets - 1)) && h->stripes_off >= sizeof(vela_header) &&
             h->buckets_off >= h->stripes_off + (uint64_t)h->stripes * sizeof(vela_stripe) &&
             h->tagbuckets_off >= h->buckets_off + (uint64_t)h->stripes * h->buckets * 4 &&
             h->leases_off >= h->tagbuckets_off + (uint64_t)h->stripes * h->tagbuckets * 4 &&
             h->slots_off >= h->leases_off + (uint64_t)h->stripes * VELA_LEASES_PER_STRIPE * sizeof(vela_lease) &&
             h->log_off >= h->slots_off + VELA_STAT_SLOTS * sizeof(vela_slot) &&
             h->cluster_off >= h->log_off + h->log_size && h->log_size % 8 == 0 &&
             h->heap_off >= h->cluster_off + sizeof(vela_cluster) &&
             h->heap_off % 8 == 0 && h->heap_end == (size & ~(uint64_t)7) && h->heap_off + 4096 < h->heap_end &&
             h->eviction <= 2;
    if (!ok)
        return vela_fail(VELA_ECORRUPT, "segment header is inconsistent");
    return VELA_OK;
}

const char *vela_topology_name(uint32_t topology)
{
    static const char *const names[] = {"local", "replicated", "partitioned"};
    return topology < 3 ? names[topology] : "unknown";
}

vela_err vela_open(int fd, int lock_fd, const vela_options *o, vela_table *out)
{
    vela_err err = VELA_OK;
    uint8_t *base = MAP_FAILED;
    uint64_t size = 0;
    memset(out, 0, sizeof *out);
    out->fd = -1;

    while (lock_fd >= 0 && flock(lock_fd, LOCK_EX) != 0)
        if (errno != EINTR)
            return vela_fail_sys("flock", "locking the segment to open it");

    struct stat st;
    if (fstat(fd, &st) != 0) {
        err = vela_fail_sys("fstat", "reading the segment's size");
        goto out;
    }
    size = (uint64_t)st.st_size;
    if (size > 0 && size < sizeof(vela_header) && !o->reinit_unready) {
        err = vela_fail(VELA_ECORRUPT, "segment of %llu bytes is too short to be a Vela table",
                        (unsigned long long)size);
        goto out;
    }
    if (size >= sizeof(vela_header)) {
        base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
            err = vela_fail_sys("mmap", "mapping the segment");
            goto out;
        }
        vela_header *h = (vela_header *)base;
        if (__atomic_load_n(&h->ready, __ATOMIC_ACQUIRE) == VELA_READY) {
            if ((err = validate(h, size)) != VELA_OK || (err = check_agreement(h, o)) != VELA_OK)
                goto out;
            bind_handle(out, base, size, fd);
            goto out;
        }
        if (!o->reinit_unready) {
            err = vela_fail(VELA_ECORRUPT, "not a finished Vela table (no READY mark: another "
                            "format, random bytes, or its creator died while laying it out)");
            goto out;
        }
        munmap(base, size);
        base = MAP_FAILED;
    }

    /* New, or its creator died before READY: lay it out afresh. */
    uint64_t cap = o->capacity > 0 ? (uint64_t)o->capacity : VELA_DEFAULT_CAPACITY;
    if (cap < VELA_MIN_CAPACITY || cap > VELA_MAX_CAPACITY) {
        err = vela_fail(VELA_EINVAL, "capacity must be from %llu bytes (1 MiB) to %llu bytes (32 GiB), not %llu",
                        VELA_MIN_CAPACITY, VELA_MAX_CAPACITY, (unsigned long long)cap);
        goto out;
    }
    vela_header probe;
    memset(&probe, 0, sizeof probe);
    if ((err = lay_out(&probe, o, cap)) != VELA_OK)
        goto out;
    if (ftruncate(fd, 0) != 0 || ftruncate(fd, (off_t)cap) != 0) {
        err = vela_fail_sys("ftruncate", "sizing the new segment");
        goto out;
    }
    /* Reserve the memory now: a tmpfs that runs out later would kill a worker
     * with SIGBUS on some put instead of failing here with a clear error. */
    int rc = posix_fallocate(fd, 0, (off_t)cap);
    if (rc != 0) {
        errno = rc;
        err = vela_fail_sys("posix_fallocate", "reserving the segment's memory (is /dev/shm or the "
                            "disk too small for this capacity?)");
        ftruncate(fd, 0);
        goto out;
    }
    size = cap;
    base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        err = vela_fail_sys("mmap", "mapping the new segment");
        goto out;
    }
    memcpy(base, &probe, sizeof probe);
    bind_handle(out, base, size, fd);
    if ((err = initialise(out)) != VELA_OK)
        memset(out, 0, sizeof *out);

out:
    if (lock_fd >= 0)
        flock(lock_fd, LOCK_UN);
    if (err != VELA_OK) {
        if (base != MAP_FAILED)
            munmap(base, size);
        memset(out, 0, sizeof *out);
        out->fd = -1;
        return err;
    }
    vela_stats_attach(out);
    return VELA_OK;
}

void vela_close(vela_table *t)
{
    if (t->base) {
        munmap(t->base, t->size);
        t->base = NULL;
    }
    if (t->fd >= 0) {
        close(t->fd);
        t->fd = -1;
    }
}

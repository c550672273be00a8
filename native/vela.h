/*
 * vela.h -- the internal API of the C core, shared by every file of native/.
 * The segment layout itself is in table.h; this file is about the process-local
 * handle, errors and the functions each file exports.
 */
#ifndef VELA_H
#define VELA_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "table.h"

/* ---- errors (error.c) ---------------------------------------------------- */
typedef enum vela_err {
    VELA_OK = 0,
    VELA_ENOTFOUND,     /* no such key (not an error for most callers) */
    VELA_EFULL,         /* no room, and the policy forbids evicting live entries */
    VELA_ETOOLARGE,     /* entry bigger than max_entry_size */
    VELA_ELAYOUT,       /* segment made with other options or another format */
    VELA_ESYS,          /* a system call failed; the message names it and errno */
    VELA_EPOISONED,     /* a repair failed; the table refuses work */
    VELA_ETIMEOUT,      /* a lock stayed held past the lock timeout */
    VELA_ECORRUPT,      /* the segment's contents are not a valid table */
    VELA_EINVAL,        /* bad argument */
    VELA_ENOTINT,       /* incr on a value that is not an integer counter */
    VELA_EOVERFLOW,     /* incr left the int64 range */
    VELA_EFORMAT,       /* not a Vela segment, or one of another layout format */
    VELA_ECALLER,       /* the caller's callback failed; the caller's own error stands */
    VELA_ERR_COUNT
} vela_err;

/* Record an error for this thread and return it. The message starts with the
 * code's symbol ("VELA_EFULL: ..."); the binding turns it into an exception. */
vela_err vela_fail(vela_err err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Same, for a failed system call: appends strerror(errno). */
vela_err vela_fail_sys(const char *call, const char *what);
const char *vela_last_message(void);
const char *vela_err_name(vela_err err);

/* ---- the process-local handle (segment.c) -------------------------------- */
typedef struct vela_table {
    uint8_t *base;            /* start of the mapping */
    uint64_t size;            /* bytes mapped */
    int fd;                   /* the segment's file descriptor (owned) */
    vela_header *hdr;
    vela_stripe *stripes;
    uint32_t *buckets;        /* [stripes][buckets] */
    uint32_t *tagbuckets;     /* [stripes][tagbuckets] */
    vela_slot *slots;
    vela_lease *leases;       /* [stripes][VELA_LEASES_PER_STRIPE] */
    uint8_t *log;             /* change log ring (hdr->log_size bytes) */
    vela_cluster *cluster;
    vela_slot *my_slot;       /* this process's stats slot */
    uint32_t my_pid;          /* pid the slot was claimed for (fork changes it) */
    uint64_t my_start;
    uint32_t stripe_mask, bucket_mask, tagbucket_mask;
    int clock_id;             /* CLOCK_MONOTONIC (shm) or CLOCK_REALTIME (file) */
    int stats_enabled;
    int64_t lock_timeout_ns;
} vela_table;

/* Options asked for by the opener. A field < 0 means "not given: adopt the
 * segment's value (or the default when creating)". */
typedef struct vela_options {
    int64_t capacity;
    int64_t stripes;
    int64_t max_size;         /* 0 = unbounded */
    int64_t max_entry_size;
    int64_t eviction;
    int backend;              /* enum vela_backend_kind; always given */
    int reinit_unready;       /* lay out a non-empty segment that never became READY */
    int topology;             /* -1 adopt, else enum vela_topology */
} vela_options;

#define VELA_DEFAULT_CAPACITY (64ull << 20)
#define VELA_MIN_CAPACITY (1ull << 20)
#define VELA_MAX_CAPACITY (32ull << 30)   /* refs are 32-bit units of 8 bytes */

/* Map the segment behind `fd` (which the handle then owns), creating and
 * initialising it if it is empty. Race-safe: the initialisation runs under
 * flock(lock_fd); lock_fd -1 means the caller holds its own lock. A segment
 * that is not empty but not READY (its creator died half-way) is laid out
 * afresh when opts->reinit_unready is set, else refused with VELA_ECORRUPT.
 * Fills *out. */
vela_err vela_open(int fd, int lock_fd, const vela_options *opts, vela_table *out);
const char *vela_topology_name(uint32_t topology);
/* Header checksum over the fields that never change after creation. */
uint64_t vela_header_checksum(const vela_header *h);
void vela_close(vela_table *t);
/* Identity of a process: its start time in clock ticks since boot, 0 if gone. */
uint64_t vela_proc_start_time(uint32_t pid);
/* Nonzero when the process (pid, start) still runs. */
int vela_proc_alive(uint32_t pid, uint64_t start);
int64_t vela_now(const vela_table *t);
int64_t vela_monotonic_ns(void);

/* ---- refs ----------------------------------------------------------------- */
static inline void *vela_at(const vela_table *t, uint32_t ref) { return t->base + ((uint64_t)ref << 3); }
static inline uint32_t vela_ref(const vela_table *t, const void *p) {
    return (uint32_t)(((const uint8_t *)p - t->base) >> 3);
}
static inline vela_block *blk(const vela_table *t, uint32_t ref) { return (vela_block *)vela_at(t, ref); }
static inline uint32_t vela_block_size(const vela_block *b) { return b->size_flags & ~VELA_BLK_FLAGS; }
static inline vela_entry *vela_entry_of(vela_block *b) { return (vela_entry *)(b + 1); }
/* A tag link stores the tag's hash with its low byte replaced by the link's
 * index in the entry, so the entry can be found from the link. */
#define VELA_TAG_MASK (~(uint64_t)0xFF)
static inline vela_taglink *vela_tags_of(vela_entry *e) { return (vela_taglink *)(e + 1); }
static inline uint8_t *vela_key_of(vela_entry *e) { return (uint8_t *)(vela_tags_of(e) + e->ntags); }
static inline uint8_t *vela_value_of(vela_entry *e) { return vela_key_of(e) + e->key_len; }
static inline uint32_t *vela_bucket(const vela_table *t, uint32_t s, uint64_t hash) {
    return &t->buckets[(uint64_t)s * (t->bucket_mask + 1) + ((hash >> 32) & t->bucket_mask)];
}
static inline uint32_t *vela_tagbucket(const vela_table *t, uint32_t s, uint64_t tag) {
    return &t->tagbuckets[(uint64_t)s * (t->tagbucket_mask + 1) + ((tag >> 32) & t->tagbucket_mask)];
}
static inline uint32_t vela_stripe_of(const vela_table *t, uint64_t hash) { return (uint32_t)(hash & t->stripe_mask); }
/* Bytes of the block that holds an entry of these sizes (0 on overflow). */
uint64_t vela_entry_block_size(size_t key_len, size_t value_len, size_t ntags);

/* ---- locks (lock.c) -------------------------------------------------------- */
vela_err vela_lock_init(vela_lock *l);
/* Take stripe s; repairs it first when its previous owner died. */
vela_err vela_stripe_lock(vela_table *t, uint32_t s);
void vela_stripe_unlock(vela_table *t, uint32_t s);
/* Try stripe s without waiting, for a caller that HOLDS the heap lock
 * (eviction): a dead owner's stripe is repaired at once. 1 = taken. */
int vela_stripe_trylock_holding_heap(vela_table *t, uint32_t s);
/* Try stripe s without waiting, for a caller that holds NO heap lock
 * (inspection). It never repairs (repair frees blocks into the heap): a
 * stripe whose owner died is marked repair_due for the next locker and
 * reported, not taken. */
typedef enum vela_trylock { VELA_TRY_LOCKED, VELA_TRY_BUSY, VELA_TRY_OWNER_DEAD } vela_trylock;
vela_trylock vela_stripe_trylock_without_heap(vela_table *t, uint32_t s);
vela_err vela_heap_lock(vela_table *t);
void vela_heap_unlock(vela_table *t);
vela_err vela_admin_lock(vela_table *t);
void vela_admin_unlock(vela_table *t);
/* The binding provides these: give up / take back the interpreter lock around
 * a wait (no-ops when the caller already runs without it). */
void *vela_wait_begin(void);
void vela_wait_end(void *token);

/* ---- heap (heap.c) ---------------------------------------------------------- */
void vela_heap_init(vela_table *t);
/* Allocate `size` bytes (multiple of 8) for stripe s; records the block in
 * stripes[s].pending[slot] before it is marked used. Heap lock held.
 * Returns the block ref, 0 when no free block is big enough. */
uint32_t vela_heap_alloc(vela_table *t, uint32_t size, uint32_t s, int slot);
/* Allocate from the given free block (the evictor found it). */
uint32_t vela_heap_take(vela_table *t, uint32_t ref, uint32_t size, uint32_t s, int slot);
/* Free a used block; returns the ref of the (coalesced) free block. Heap lock held. */
uint32_t vela_heap_free(vela_table *t, uint32_t ref);
/* Rebuild free lists and flags from one physical walk (dead lock owner). */
vela_err vela_heap_repair(vela_table *t);
/* Nonzero when ref is the start of a block in the physical chain. O(blocks). */
int vela_heap_is_block(vela_table *t, uint32_t ref);
uint32_t vela_heap_first(const vela_table *t);
uint32_t vela_heap_end(const vela_table *t);
/* Append heap problems to the report (check.c's collector); marks used entry
 * blocks in used_map and spare (arena) blocks in arena_map. */
struct vela_report;
void vela_heap_check(vela_table *t, struct vela_report *r, uint8_t *used_map, uint8_t *arena_map);

/* ---- per-stripe arenas (arena.c): spare blocks a stripe allocates from without
 * the heap lock. All with stripe s locked. ------------------------------------- */
/* A spare block that fits an entry of `size` bytes, recorded in pending[slot],
 * now an entry block; 0 when the arena has none. */
uint32_t vela_arena_take(vela_table *t, uint32_t s, uint32_t size, int slot);
/* Whether the arena would keep a block of `size` bytes (vela_arena_keep). */
int vela_arena_would_keep(const vela_table *t, uint32_t s, uint32_t size);
/* Keep the unlinked entry block `ref` (recorded in pending by the caller) as a
 * spare block; 0 when there is no room (the caller frees it to the heap). */
int vela_arena_keep(vela_table *t, uint32_t s, uint32_t ref);
/* Heap locked too: add spare blocks of `size` bytes taken from free memory. */
void vela_arena_refill(vela_table *t, uint32_t s, uint32_t size);
/* Heap locked too: give every spare block back to the heap. */
void vela_arena_drain(vela_table *t, uint32_t s);
/* Bytes of spare blocks in all arenas (of memory_used), read without locks. */
uint64_t vela_arena_spare_bytes(const vela_table *t);
/* Takes stripe s and the heap itself: give its arena back (crash tests: a put
 * that must refill). */
vela_err vela_arena_give_back(vela_table *t, uint32_t s);
/* Heap locked, stripe s locked: drain every arena that can be try-locked. */
void vela_arena_reclaim(vela_table *t, uint32_t s);
/* Stripe repair (heap locked): free pending blocks no chain reaches and the arena. */
void vela_arena_repair(vela_table *t, uint32_t s, int (*reachable)(void *ctx, uint32_t ref), void *ctx);
/* check(): verify stripe s's arena against the heap's arena_map; adds its blocks. */
void vela_arena_check(vela_table *t, uint32_t s, struct vela_report *r, const uint8_t *arena_map,
                      uint64_t *blocks);

/* ---- entries (table.c) -------------------------------------------------------- */
typedef struct vela_key {
    const uint8_t *bytes;
    size_t len;
    uint64_t hash;
} vela_key;

typedef struct vela_put_args {
    const vela_key *key;
    const uint8_t *value;
    size_t value_len;
    uint8_t codec;
    int64_t expire_at;        /* on the segment's clock; 0 = never expires */
    const uint64_t *tags;
    size_t ntags;
    int only_if_absent;       /* do not replace an existing live entry */
    uint64_t version;         /* 0: a new local version; else the version to store (replication) */
    uint64_t *version_out;    /* where to write the stored entry's version, or NULL */
} vela_put_args;

/* Find a live entry in stripe s (locked). An expired entry found on the way is
 * reclaimed; when that fails (the heap lock) *err is set and 0 returned. A
 * tombstone counts as absent. Returns the entry block ref or 0. */
uint32_t vela_find(vela_table *t, uint32_t s, const vela_key *k, vela_err *err);
/* The same, tombstones included (what versions are compared against). */
uint32_t vela_find_any(vela_table *t, uint32_t s, const vela_key *k, vela_err *err);
/* Replicated caches: replace the key's entry (if any) by a tombstone of `version`,
 * so the delete travels in snapshots and beats older puts. Stripe s locked. */
vela_err vela_do_tombstone(vela_table *t, uint32_t s, const vela_key *k, uint64_t version);
/* Insert or replace (stripe s locked by the caller). */
vela_err vela_do_put(vela_table *t, uint32_t s, const vela_put_args *a);
/* Unlink and free entry `ref` of stripe s (locked), inside a write of its own;
 * heap_held: the caller holds the heap lock (the block goes to the heap, else
 * a small one to the stripe's arena). Returns the ref of the free block it
 * became part of, or of the spare block it became (0 if it was not linked). */
uint32_t vela_remove_entry(vela_table *t, uint32_t s, uint32_t ref, int heap_held, vela_err *err);
/* Convenience wrappers that lock. */
vela_err vela_put(vela_table *t, const vela_put_args *a);
/* Store only if no live entry has the key (*stored = 1 then), atomically. */
/* What a conditional put asks of the key's live entry, checked under its stripe lock
 * (so one check-and-store at a time, in every process of the host). */
typedef enum vela_put_cond {
    VELA_IF_ABSENT,  /* add: no live entry has the key */
    VELA_IF_PRESENT, /* replace: a live entry has it */
    VELA_IF_EQUAL,   /* cas: a live entry whose codec and value bytes are `expected`'s;
                        the entry keeps its tags (a->tags is ignored) */
} vela_put_cond;

typedef struct vela_expected {
    const uint8_t *value;
    size_t value_len;
    uint8_t codec;
} vela_expected;

/* Store a's entry only when `cond` holds (expected: VELA_IF_EQUAL only, else NULL);
 * *stored says whether it did. Logged and counted as a put. */
vela_err vela_put_if(vela_table *t, const vela_put_args *a, vela_put_cond cond, const vela_expected *expected,
                     int *stored);
/* Partitioned: a worker's put/delete of a key its host owns, made (and logged for
 * the bridge) only while the cluster view is still `view_seq`, checked under the
 * key's stripe lock. The bridge publishes a new view before it copies a partition
 * away, and copies stripe by stripe under the same locks: a change made here is
 * in that copy, or refused (*done = 0: the caller asks the owner's bridge). */
vela_err vela_put_if_view(vela_table *t, const vela_put_args *a, uint32_t view_seq, int *done);
vela_err vela_delete_if_view(vela_table *t, const vela_key *k, uint32_t view_seq, int *done, int *removed);
int vela_delete(vela_table *t, const vela_key *k, vela_err *err);
/* Remove entries with a version below `below` (UINT64_MAX: all). */
vela_err vela_flush(vela_table *t, uint64_t below, uint64_t *removed);
/* A worker's flush / tag invalidation: under a new *version (entries newer than
 * it, applied from another host meanwhile, survive it here as everywhere),
 * logged for the bridge. */
vela_err vela_flush_logged(vela_table *t, uint64_t *removed, uint64_t *version);
vela_err vela_invalidate_tag_logged(vela_table *t, uint64_t tag, uint64_t *removed, uint64_t *version);
/* Partitioned caches: remove every entry whose partition (hash % parts) has
 * drop[partition] set, and void every near-cache reservation in flight. */
vela_err vela_drop_partitions(vela_table *t, uint32_t parts, const uint8_t *drop, uint64_t *removed);
/* Remove entries carrying `tag` with a version below `below`; *removed counts live ones. */
vela_err vela_invalidate_tag(vela_table *t, uint64_t tag, uint64_t below, uint64_t *removed);
/* The same, counting only entries whose partition (hash % parts) has counted[] set
 * (a partitioned host counts what it owns, not its backup or near-cache copies). */
vela_err vela_invalidate_tag_counted(vela_table *t, uint64_t tag, uint64_t below, uint32_t parts,
                                     const uint8_t *counted, uint64_t *removed);
vela_err vela_touch(vela_table *t, const vela_key *k, int64_t expire_at, int *found);
/* Remaining ns: -1 never expires; sets *found. */
vela_err vela_ttl(vela_table *t, const vela_key *k, int64_t *remaining, int *found);
/* A missing key starts at `initial` (and takes expire_at); an existing counter keeps its expiry. */
vela_err vela_incr(vela_table *t, const vela_key *k, int64_t delta, int64_t initial, int64_t expire_at,
                   int64_t *result);
int vela_is_expired(const vela_table *t, const vela_entry *e, int64_t now);
/* Whether a read of an entry with this mark should update it (lfu rolls dice). */
int vela_access_due(const vela_table *t, uint8_t access);
/* Set the access mark of an entry that was just read (one store). */
void vela_mark_access(vela_table *t, vela_block *b);
uint32_t vela_entry_checksum(const vela_entry *e);
/* Begin / end a write on stripe s (locked): the sequence goes odd / even. */
void vela_write_begin(vela_table *t, uint32_t s);
void vela_write_end(vela_table *t, uint32_t s);
uint64_t vela_size(const vela_table *t);
void vela_tags_link(vela_table *t, uint32_t s, vela_entry *e);
void vela_tags_unlink(vela_table *t, uint32_t s, vela_entry *e);

/* ---- versions and the change log (log.c) ---------------------------------------------- */
/* A new version: hybrid logical clock (ms since 2020 << 20 | counter << 12 | node id),
 * greater than every version this segment handed out or observed. */
uint64_t vela_next_version(vela_table *t);
void vela_observe_version(vela_table *t, uint64_t version);
/* Append a change for the bridge (no-op unless the cache is replicated).
 * Called with the key's stripe locked (per-key order = log order). */
void vela_log_append(vela_table *t, uint8_t op, const vela_key *k, uint8_t codec, const uint8_t *value,
                     size_t value_len, const uint64_t *tags, size_t ntags, uint64_t version, int64_t expire_at);
void vela_log_put(vela_table *t, const vela_put_args *a, uint64_t version);
/* The same for any cache with a log (a partitioned cache logs the writes workers
 * make in the partitions their host owns: vela_put_if_view, vela_delete_if_view). */
void vela_log_write(vela_table *t, uint8_t op, const vela_key *k, uint8_t codec, const uint8_t *value,
                    size_t value_len, const uint64_t *tags, size_t ntags, uint64_t version, int64_t expire_at);
vela_err vela_log_lock(vela_table *t);
void vela_log_unlock(vela_table *t);
/* The bridge's reader, without a lock: fn(ctx, record, tags, key, value, now)
 * for up to `max` records from *pos on (advanced past them). *lapped: writers
 * overwrote what was not read yet, or came round while it read: what fn saw
 * must be thrown away, and the bridge resyncs. VELA_ECALLER when fn failed. */
typedef int (*vela_log_fn)(void *ctx, const vela_log_record *r, const uint64_t *tags, const uint8_t *key,
                           const uint8_t *value, int64_t now);
vela_err vela_log_read(vela_table *t, uint64_t *pos, uint32_t max, vela_log_fn fn, void *ctx, int *lapped);

/* ---- the cluster view (cluster.c) ------------------------------------------------------- */
/* The bridge publishes its view (JSON bytes); VELA_EINVAL when too long. */
vela_err vela_cluster_publish(vela_table *t, const char *json, size_t len);
/* Copy the view out (a seqlock read); its length, 0 when none was written. */
size_t vela_cluster_read(const vela_table *t, char out[VELA_CLUSTER_BYTES]);
/* Changes whenever a new view is published (workers re-read only then). */
uint32_t vela_cluster_seq(const vela_table *t);

/* ---- applying remote changes (replica.c) ----------------------------------------------- */
/* Last writer wins: stored only when newer than what the table has. Not logged. */
vela_err vela_apply_put(vela_table *t, const vela_put_args *a, int *applied);
vela_err vela_apply_delete(vela_table *t, const vela_key *k, uint64_t version, int *removed);
/* Snapshot: call fn for up to `max` live entries from *cursor on; *cursor becomes
 * UINT64_MAX when the table is done. Takes one stripe lock at a time. */
typedef int (*vela_scan_fn)(void *ctx, vela_entry *e, int64_t now);
vela_err vela_scan(vela_table *t, uint64_t *cursor, uint32_t max, vela_scan_fn fn, void *ctx);

/* ---- lock-free reads (read.c) -------------------------------------------------------- */
typedef enum vela_read_result {
    VELA_READ_FOUND,   /* *out is the entry; valid only if the sequence is unchanged */
    VELA_READ_ABSENT,  /* no such key; valid only if the sequence is unchanged */
    VELA_READ_RETRY,   /* saw something impossible: the chain changed under us */
    VELA_READ_LOCKED,  /* the read must store (expiry, access mark): use the lock */
} vela_read_result;
/* Sequence of stripe s to validate against (odd: a write is in progress). */
uint32_t vela_read_begin(const vela_table *t, uint32_t s);
int vela_read_valid(const vela_table *t, uint32_t s, uint32_t seq);
/* What a lock-free lookup found: checked to lie inside the heap. */
typedef struct vela_view {
    uint32_t ref;
    uint8_t codec;
    const uint8_t *value;
    uint32_t value_len;
    uint64_t version;
} vela_view;
vela_read_result vela_find_unlocked(const vela_table *t, uint32_t s, const vela_key *k, vela_view *out);
/* How a lookup hands a value out. copy() is called once per attempt, either
 * lock-free (the copy may then turn out torn: drop() gets its result and
 * throws the copy away, and the lookup tries again) or under the stripe lock,
 * which the core releases itself. copy returns 0, or -1 when it failed. */
typedef struct vela_reader {
    int (*copy)(void *ctx, uint8_t codec, const uint8_t *value, uint32_t len);
    void (*drop)(void *ctx, int copied);
    void *ctx;
} vela_reader;
/* Look k up: a few lock-free attempts (seqlock), then under the stripe lock.
 * reader NULL: only whether it is there. *found 1/0; VELA_ECALLER when copy failed. */
vela_err vela_lookup(vela_table *t, const vela_key *k, const vela_reader *reader, int *found);
/* vela_lookup, also giving the version of the entry it copied (read with the
 * copy, in the same seqlock window or under the lock; 0 when none is found). */
vela_err vela_lookup_versioned(vela_table *t, const vela_key *k, const vela_reader *reader, int *found,
                               uint64_t *version);
/* The write version of k's live entry, 0 when absent, expired or deleted: what a
 * process's decoded copy of the value is checked against (nothing copied). */
vela_err vela_version_of(vela_table *t, const vela_key *k, uint64_t *version);
/* Call fn(ctx, entry, now) on k's live entry under its stripe lock, marking
 * the access (the bridge's raw read; fn NULL: only whether it is there).
 * *found; VELA_ECALLER when fn failed. */
vela_err vela_with_entry(vela_table *t, const vela_key *k, vela_scan_fn fn, void *ctx, int *found);
/* Copy the value of entry `ref` of stripe s (locked) out, marking the access. */
vela_err vela_read_locked(vela_table *t, uint32_t ref, const vela_reader *reader);

/* ---- eviction (evict.c) ---------------------------------------------------------- */
/* Make room for a block of `size` bytes for stripe s (locked) with the heap
 * locked: evicts along the clock hand. Returns the allocated block or 0 with
 * the error set (VELA_EFULL). */
uint32_t vela_evict_alloc(vela_table *t, uint32_t s, uint32_t size, int slot);
/* Evict one entry to honour max_size (heap locked). 1 when one was evicted. */
int vela_evict_one(vela_table *t, uint32_t s);

/* ---- repair (repair.c) ----------------------------------------------------------- */
/* Repair stripe s after its lock owner died (stripe locked; heap_held tells
 * whether the caller holds the heap lock). */
vela_err vela_stripe_repair(vela_table *t, uint32_t s, int heap_held);
/* Validate one entry block of stripe s: 0 when sound, else a static reason. */
const char *vela_entry_problem(vela_table *t, uint32_t s, uint32_t ref);

/* ---- rebuild (rebuild.c) ----------------------------------------------------------- */
/* Rebuild every structure of a table from the entries that validate (bounds,
 * checksum, no overlap, not expired): locks re-initialised, heap re-laid,
 * chains and tags relinked, counters recounted. Only for a table no other
 * process has open (the file backend's first opener). */
vela_err vela_rebuild(vela_table *t, uint64_t *kept, uint64_t *dropped);
/* Write dirty pages of the mapping to the file (msync). */
vela_err vela_sync(vela_table *t);

/* ---- integrity check (check.c) ----------------------------------------------------- */
typedef struct vela_report {
    char **lines;
    size_t count, cap;
    int truncated;
} vela_report;
void vela_report_add(vela_report *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void vela_report_free(vela_report *r);
/* Stop the world (every stripe, then the heap) and verify every invariant. */
vela_err vela_check(vela_table *t, vela_report *r);

/* ---- sweep (sweep.c) ---------------------------------------------------------------- */
/* Reclaim expired entries of every stripe, at most `chunk` buckets per lock hold. */
vela_err vela_sweep(vela_table *t, uint32_t chunk, uint64_t *reclaimed);
/* 1 when this process is (now) the host's sweeper; stale_ns: a silent sweeper
 * is replaced after that long. */
vela_err vela_sweeper_elect(vela_table *t, int64_t stale_ns, int *elected);

/* ---- stats (stats.c) ---------------------------------------------------------------- */
void vela_stats_attach(vela_table *t);
static inline void vela_count(vela_table *t, enum vela_stat which, uint64_t n) {
    if (t->my_slot)
        __atomic_fetch_add(&t->my_slot->counter[which], n, __ATOMIC_RELAXED);
}
#define VELA_COUNT(t, which) do { if ((t)->stats_enabled) vela_count((t), (which), 1); } while (0)
void vela_stats_sum(vela_table *t, uint64_t out[VELA_STAT_COUNT]);
void vela_stats_reset(vela_table *t);

/* ---- near cache (near.c) ------------------------------------------------------------- */
/* A reservation for filling `k` from the remote store: the stripe's
 * invalidation sequence now. */
vela_err vela_reserve(vela_table *t, const vela_key *k, uint32_t *token);
/* Store the fill only if no invalidation hit the stripe since the reservation;
 * *stored says whether it did. */
vela_err vela_fill(vela_table *t, const vela_put_args *a, uint32_t token, int *stored);
/* Drop `k` (if present) and void the reservations of its stripe; *removed. */
vela_err vela_invalidate(vela_table *t, const vela_key *k, int *removed);
/* Void every reservation (the remote store's notifications were lost). */
void vela_invalidate_all_reservations(vela_table *t);

/* ---- stampede leases (lease.c) ------------------------------------------------------ */
typedef enum vela_fetch_status {
    VELA_FETCH_HIT = 0,      /* the value is there: the reader copied it */
    VELA_FETCH_MINE = 1,     /* this process holds the lease: run the fetch, then complete */
    VELA_FETCH_TIMEOUT = 2,  /* waited the whole budget: fetch without a lease */
    VELA_FETCH_ALONE = 3,    /* no lease possible (slots full, or the last fetch could not be
                                stored): fetch without a lease */
    VELA_FETCH_BUSY = 4,     /* budget 0 and another live process holds the lease: nothing
                                was counted; ask again with a budget to wait */
} vela_fetch_status;

typedef struct vela_lease_token {
    uint32_t stripe, slot;
    uint64_t hash;
} vela_lease_token;

/* Look the key up (a hit is copied out by `reader`, under the stripe lock);
 * on a miss take its lease or wait (without the stripe lock) for the holder
 * to release it, for at most `budget_ns`. A holder that died is replaced
 * within `poll_ns`. *waited tells whether it slept at all. */
vela_err vela_fetch_begin(vela_table *t, const vela_key *k, int64_t budget_ns, int64_t poll_ns,
                          const vela_reader *reader, vela_fetch_status *status, vela_lease_token *token,
                          int *waited);
/* Store the fetched value (a NULL args: the fetch failed) and release the lease. */
vela_err vela_fetch_complete(vela_table *t, const vela_lease_token *token, const vela_put_args *a);
/* Release every lease held by a process (gunicorn's child_exit). Returns how many. */
uint32_t vela_leases_release_pid(vela_table *t, uint32_t pid);
uint32_t vela_leases_held(vela_table *t);

/* ---- inspection without waiting (inspect.c) -------------------------------------------- */
typedef struct vela_stripe_snapshot_t {
    uint64_t entries, bytes;
    uint32_t seq, holder_pid, recoveries;
} vela_stripe_snapshot_t;
void vela_stripe_snapshot(const vela_table *t, uint32_t s, vela_stripe_snapshot_t *out);
/* Copy lease slot i (of stripes * VELA_LEASES_PER_STRIPE); 1 when it is held. */
int vela_lease_snapshot(const vela_table *t, uint32_t i, vela_lease *out);
/* Call fn for up to `max` live entries of stripe s if it can be locked without
 * waiting. Returns the count, -1 when the stripe is busy, -2 when fn failed. */
typedef int (*vela_sample_fn)(void *ctx, vela_entry *e, int64_t now);
int vela_sample_stripe(vela_table *t, uint32_t s, uint32_t max, vela_sample_fn fn, void *ctx);

/* ---- test hooks ----------------------------------------------------------------------- */
/* Phase at which vela_do_put stops forever (crash tests), 0 = never: 1-3 table.c,
 * 4-5 heap.c, 6-8 arena.c. */
extern int vela_debug_stall_phase;
void vela_debug_stall(int phase);

#endif /* VELA_H */

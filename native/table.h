/*
 * table.h -- THE layout of a Vela segment. Every other file refers to it.
 *
 * A segment is one contiguous mapping (POSIX shm object or a file) that every
 * process of a host maps MAP_SHARED, at whatever address it gets. Nothing in it
 * is a pointer: a place in the segment is a "ref", its byte offset divided by 8
 * (so 32 bits address 32 GiB), and ref 0 means "none" (offset 0 is the header,
 * never a block).
 *
 *   +--------------------+ 0
 *   | vela_header        |  magic, format, options that must agree, heap state,
 *   |                    |  admin lock, sweeper, global counters   (4 KiB aligned)
 *   +--------------------+ stripes_off
 *   | vela_stripe[S]     |  one robust mutex + write sequence + counters each
 *   +--------------------+ buckets_off
 *   | u32 bucket[S][B]   |  head ref of each bucket chain
 *   +--------------------+ tagbuckets_off
 *   | u32 tagbucket[S][T]|  head ref of each tag-link chain
 *   +--------------------+ leases_off
 *   | vela_lease[S][L]   |  stampede leases: who fetches which key now
 *   +--------------------+ slots_off
 *   | vela_slot[N]       |  per-process stats counters (one writer each)
 *   +--------------------+ log_off       (replicated and partitioned caches)
 *   | change log ring    |  what workers changed, for the bridge to send
 *   +--------------------+ cluster_off
 *   | vela_cluster       |  the cluster view the bridge writes (members, epoch)
 *   +--------------------+ heap_off
 *   | heap: blocks ...   |  every entry is one block; free blocks in TLSF lists
 *   | sentinel block     |  8 bytes, always "used": coalescing stops there
 *   +--------------------+ capacity
 *
 * Why it is correct under SIGKILL at any instruction:
 *   - A write builds its entry in a block no reader can reach, then publishes it
 *     with ONE aligned 32-bit store (bucket head or predecessor's `next`). A
 *     reader sees the old chain or the new one, never a half-built entry.
 *   - Every block a write allocates or unlinks is first recorded in its stripe's
 *     `pending` slots; the next locker of a stripe whose owner died (EOWNERDEAD)
 *     frees pending blocks that no chain reaches, re-validates every entry of
 *     the stripe, rebuilds its tag chains and recounts it. Nothing that was
 *     published (acknowledged) is dropped.
 *   - The heap's physical chain (block sizes) only changes by single stores
 *     that keep it walkable (split: write the remainder header, then shrink;
 *     merge: grow). A heap whose lock owner died is rebuilt by one walk.
 *   - A header word `used` flips a block between free and used with one store.
 *   - A stripe's arena (spare blocks it owns, arena.c) is one chain whose head
 *     a single store changes; a block leaving or joining it is recorded in
 *     `pending` first, so repair finds every spare block and gives it back.
 *
 * Lock order (see lock.c): stripe -> heap. Other stripes are only ever
 * try-locked while holding the heap (eviction), so no cycle can form; and
 * inspection try-locks with nothing held, never repairing (that needs the heap).
 */
#ifndef VELA_TABLE_H
#define VELA_TABLE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* "VELA" + a byte-order witness: a segment of the other endianness reads as
 * another number and is refused as a layout mismatch. */
#define VELA_MAGIC 0x56454C41A1B2C3D4ULL
/* Layout version; bump on every change of this file. The compiler holds you to
 * it: the size and alignment of every shared struct is asserted for this
 * format at the end of the file, so a layout change fails to build until the
 * format is bumped and the sizes there are updated. */
#define VELA_FORMAT 4u /* 4: per-stripe allocation arenas (vela_stripe.arena*, VELA_KIND_ARENA) */
#define VELA_READY 0x52454459u /* "REDY": set last by the creator */

#define VELA_LINE 128         /* padding unit: two x86 lines (adjacent prefetch) */
#define VELA_ALIGN 8          /* every block starts and ends on 8 bytes */
#define VELA_MAX_KEY 1024     /* encoded key bytes */
#define VELA_MAX_TAGS 32      /* tags per entry */
#define VELA_STAT_SLOTS 256   /* processes with a private stats slot */
#define VELA_MAX_STRIPES 4096
#define VELA_LEASES_PER_STRIPE 8 /* fetches in flight per stripe with stampede protection */
#define VELA_TOMBSTONE_TTL_NS (300LL * 1000000000LL) /* how long a replicated delete is remembered */
#define VELA_CLUSTER_BYTES 16384  /* cluster view: JSON written by the bridge */

/* Topologies. A replicated cache logs every change its workers make, for the
 * bridge to send. A partitioned one is a table whose host owns some partitions,
 * holds backup copies of others and, with the near cache, L1 copies of the
 * rest: its workers write the partitions it owns in place (logged, for the
 * bridge's backup copies and invalidations); its bridge makes every other write. */
enum vela_topology { VELA_TOPOLOGY_LOCAL = 0, VELA_TOPOLOGY_REPLICATED = 1, VELA_TOPOLOGY_PARTITIONED = 2 };

enum vela_backend_kind { VELA_BACKEND_SHM = 0, VELA_BACKEND_FILE = 1 };
enum vela_eviction { VELA_EVICT_LRU = 0, VELA_EVICT_LFU = 1, VELA_EVICT_TTL_ONLY = 2 };

/* Value codecs: how the bytes of a value are to be read. 0-2 are stored
 * without a serializer; >= 3 name the serializer that wrote them. */
enum vela_codec {
    VELA_CODEC_BYTES = 0,
    VELA_CODEC_STR = 1,    /* UTF-8 */
    VELA_CODEC_INT = 2,    /* int64, little endian */
    VELA_CODEC_PICKLE = 3,
    VELA_CODEC_JSON = 4,
    VELA_CODEC_MSGPACK = 5,
    VELA_CODEC_CUSTOM = 6,
    VELA_CODEC_TOMBSTONE = 7, /* replicated caches: a delete, kept with its version */
    VELA_CODEC_COUNT = 8
};

/* Counters in each process's stats slot. */
enum vela_stat {
    VELA_STAT_HITS,
    VELA_STAT_MISSES,
    VELA_STAT_WRITES,
    VELA_STAT_DELETES,
    VELA_STAT_EVICTIONS,
    VELA_STAT_EXPIRATIONS,
    VELA_STAT_INVALIDATIONS,
    VELA_STAT_FETCHES,
    VELA_STAT_STAMPEDE_WAITS,
    VELA_STAT_STAMPEDE_TIMEOUTS,
    VELA_STAT_LOCK_RECOVERIES,
    VELA_STAT_COUNT
};

/* ---- heap allocator geometry (TLSF: two-level segregated fit) ----------- */
#define VELA_SL_BITS 4                      /* 16 second-level lists per first level */
#define VELA_SL_COUNT (1u << VELA_SL_BITS)
#define VELA_SMALL_LIMIT 256u               /* below: first level 0, 16-byte classes */
#define VELA_FL_COUNT 26u                   /* sizes up to 4 GiB */
#define VELA_MIN_BLOCK 24u                  /* header + free links + footer */

/* Every block starts with this header (8 bytes). */
typedef struct vela_block {
    uint32_t size_flags;  /* block bytes incl. header (multiple of 8) | flag bits */
    uint16_t owner;       /* used entry block: index of the stripe that holds it */
    uint8_t kind;         /* VELA_KIND_* */
    uint8_t access;       /* lru: reference bit; lfu: saturating use counter */
} vela_block;

#define VELA_BLK_USED 1u       /* block is allocated */
#define VELA_BLK_PREV_FREE 2u  /* physical predecessor is free; its size is in the
                                  4 bytes before this header (its footer) */
#define VELA_BLK_FLAGS 7u
#define VELA_KIND_FREE 0
#define VELA_KIND_ENTRY 1
#define VELA_KIND_SENTINEL 2
#define VELA_KIND_ARENA 3 /* a stripe's spare block (arena.c): used for the heap, not an entry */

/* A free block: the header, then its list links, ..., footer = size. */
typedef struct vela_free_block {
    vela_block hdr;
    uint32_t next;  /* ref of next free block in its size-class list */
    uint32_t prev;  /* ref of previous one, 0 at the head */
} vela_free_block;

/* An entry block: header, this, then tag links, key bytes, value bytes. */
typedef struct vela_entry {
    uint64_t hash;       /* xxh3-64 of the encoded key */
    uint32_t next;       /* ref of the next entry block in the bucket chain */
    uint32_t value_len;
    int64_t expire_at;   /* ns on the segment's clock; 0 = never */
    uint64_t version;    /* write version (replication orders by it) */
    uint16_t key_len;
    uint8_t codec;       /* enum vela_codec */
    uint8_t ntags;
    uint32_t check;      /* low 32 bits of xxh3 over the fields above + tags + key + value */
} vela_entry;

/* One per tag of an entry: links all entries of a stripe that carry the tag
 * (same tag bucket), doubly, so removing an entry is O(its tags). */
typedef struct vela_taglink {
    uint64_t tag;        /* xxh3-64 of the tag's UTF-8 */
    uint32_t next;       /* ref of the next taglink in the tag bucket */
    uint32_t prev;       /* ref of the previous taglink, 0 at the head */
} vela_taglink;

#define VELA_ENTRY_OVERHEAD (sizeof(vela_block) + sizeof(vela_entry))

/* A process-shared robust mutex plus who holds it (for diagnostics). */
typedef struct vela_lock {
    pthread_mutex_t mutex;
    uint32_t holder_pid;   /* written after locking, cleared before unlocking */
    uint32_t recoveries;   /* times a dead owner's state was repaired */
} vela_lock;

typedef struct vela_stripe {
    vela_lock lock;
    uint32_t seq;          /* odd while a write is in progress */
    uint32_t pending[2];   /* blocks allocated / unlinked by the write in flight */
    uint32_t sweep_cursor; /* next bucket the sweeper looks at */
    uint32_t inval_seq;    /* near cache: bumped by every invalidation in the stripe */
    uint32_t tombstones;   /* of `entries`, how many are tombstones (replicated deletes) */
    uint64_t entries;      /* entries linked in this stripe */
    uint64_t bytes;        /* bytes of their blocks */
    uint32_t repair_due;   /* its owner died and inspection (no heap lock) took the lock
                              first: the next locker repairs it */
    uint32_t arena;        /* first spare block of the stripe's arena (arena.c), chained by
                              vela_entry.next; only the stripe's lock holder changes it */
    uint32_t arena_blocks; /* spare blocks in the arena */
    uint32_t pad_;
    uint64_t arena_bytes;  /* their bytes */
} __attribute__((aligned(VELA_LINE))) vela_stripe;

/* A stampede lease: while `hash` is set, process holder_pid runs the fetch of
 * that key and other callers wait on `futex`. Guarded by the stripe lock,
 * except `futex`, which waiters read and sleep on without it. */
typedef struct vela_lease {
    uint64_t hash;          /* key hash; 0 = free slot */
    uint32_t holder_pid;
    uint32_t futex;         /* bumped at every release; FUTEX_WAIT word */
    uint64_t holder_start;  /* the holder's start time (pid reuse guard) */
    int64_t since_ns;       /* CLOCK_MONOTONIC when it was taken */
    uint32_t outcome;       /* how it was last released: enum vela_lease_outcome */
    uint32_t pad_;
} vela_lease;

enum vela_lease_outcome { VELA_LEASE_STORED = 0, VELA_LEASE_FAILED = 1, VELA_LEASE_UNSTORED = 2 };

typedef struct vela_slot {
    uint32_t pid;          /* 0 = free */
    uint32_t pad_;
    uint64_t start_time;   /* the process's start time (clock ticks since boot) */
    uint64_t counter[VELA_STAT_COUNT];
} __attribute__((aligned(VELA_LINE))) vela_slot;

typedef struct vela_heap_state {
    vela_lock lock;
    uint32_t fl_bitmap;                   /* bit f: some list of level f non-empty */
    uint32_t sl_bitmap[VELA_FL_COUNT];    /* bit s: list (f, s) non-empty */
    uint32_t heads[VELA_FL_COUNT][VELA_SL_COUNT];
    uint32_t hand;                        /* eviction clock hand: a block ref */
    uint32_t pad_;
    uint64_t used_bytes;                  /* bytes of used blocks */
} vela_heap_state;

typedef struct vela_header {
    /* identity: checked before anything else is trusted */
    uint64_t magic;
    uint32_t format;
    uint32_t header_size;     /* sizeof(vela_header) of the writer */
    uint32_t ready;           /* VELA_READY once initialised */
    uint32_t backend;         /* enum vela_backend_kind */
    /* options every process must agree on */
    uint32_t eviction;        /* enum vela_eviction */
    uint32_t stripes;         /* power of two */
    uint32_t buckets;         /* per stripe, power of two */
    uint32_t tagbuckets;      /* per stripe, power of two */
    uint64_t capacity;        /* bytes of the whole segment */
    uint64_t max_size;        /* entries; 0 = unbounded */
    uint64_t max_entry_size;  /* bytes of one entry block */
    /* where the regions start (bytes) */
    uint64_t stripes_off, buckets_off, tagbuckets_off, leases_off, slots_off, heap_off, heap_end;
    uint64_t log_off, log_size; /* change log ring; size 0 in a local cache */
    uint64_t cluster_off;
    uint32_t topology;        /* enum vela_topology */
    uint32_t pad2_;
    int64_t created_ns;       /* CLOCK_REALTIME at creation */
    uint64_t header_check;    /* xxh3 of every field above: a damaged header is refused */
    uint32_t poisoned;        /* nonzero: a repair failed; the table refuses work */
    uint32_t clean;           /* file backend: 1 after the last process closed it cleanly */
    char host[64];            /* file backend: host name of the processes that have it open */

    uint8_t line1_[VELA_LINE];
    /* global counters, on their own line */
    uint64_t version_clock;   /* last write version handed out (atomic) */
    uint8_t line2_[VELA_LINE - 8];

    /* rare operations: sweeper election */
    vela_lock admin;
    uint32_t sweeper_pid;
    uint32_t pad1_;
    uint64_t sweeper_start;   /* start time of the sweeper process */
    int64_t sweeper_beat_ns;  /* CLOCK_MONOTONIC of its last round */
    uint8_t line3_[VELA_LINE];

    vela_heap_state heap;
    uint8_t line4_[VELA_LINE];

    /* change log (log.c): appended under log_lock, read lock-free by the bridge */
    vela_lock log_lock;
    uint64_t log_head;        /* bytes ever appended; a record is visible once head passes it */
    uint64_t log_bridge_pos;  /* how far the bridge has sent (survives a bridge restart) */
    uint64_t log_dropped;     /* records too large for the ring (the bridge resyncs) */
    uint32_t node_id;         /* this host's id in the cluster: low 12 bits of versions */
    uint32_t pad3_;
} vela_header;

/* A change log record: this header, then u64 tags[ntags], key bytes, value bytes. */
typedef struct vela_log_record {
    uint32_t len;             /* whole record in bytes, multiple of 8 */
    uint8_t op;               /* enum vela_log_op */
    uint8_t codec;
    uint16_t key_len;
    uint32_t value_len;
    uint8_t ntags;
    uint8_t pad_[3];
    uint64_t version;
    int64_t expire_at;        /* segment clock; 0 = never */
} vela_log_record;

enum vela_log_op { VELA_OP_PUT = 1, VELA_OP_DELETE = 2, VELA_OP_FLUSH = 3, VELA_OP_TAG = 4, VELA_OP_PAD = 5 };

/* The cluster view: JSON text under a sequence (odd while the bridge writes). */
typedef struct vela_cluster {
    uint32_t seq;
    uint32_t len;
    char json[VELA_CLUSTER_BYTES - 8];
} vela_cluster;

/* ---- the layout of VELA_FORMAT, checked by the compiler ---------------------------
 * Sizes are of x86-64 and aarch64 Linux; a process-shared mutex (pthread_mutex_t)
 * differs between them, so what contains one is counted in vela_lock's size. */
#if VELA_FORMAT != 4
#error "VELA_FORMAT changed: update the layout sizes below to the new format's"
#endif
#define VELA_LAYOUT(type, size, align)                                                        \
    _Static_assert(sizeof(type) == (size) && _Alignof(type) == (align),                      \
                   #type " changed size or alignment: bump VELA_FORMAT, then update it here")
VELA_LAYOUT(vela_block, 8, 4);
VELA_LAYOUT(vela_free_block, 16, 4);
VELA_LAYOUT(vela_entry, 40, 8);
VELA_LAYOUT(vela_taglink, 16, 8);
VELA_LAYOUT(vela_lock, sizeof(pthread_mutex_t) + 8, 8);
VELA_LAYOUT(vela_stripe, VELA_LINE, VELA_LINE);
VELA_LAYOUT(vela_lease, 40, 8);
VELA_LAYOUT(vela_slot, VELA_LINE, VELA_LINE);
VELA_LAYOUT(vela_heap_state, 1792 + sizeof(vela_lock), 8);
VELA_LAYOUT(vela_header, 2600 + 3 * sizeof(vela_lock), 8);
VELA_LAYOUT(vela_log_record, 32, 8);
VELA_LAYOUT(vela_cluster, VELA_CLUSTER_BYTES, 4);
/* Fields Python reads from the raw bytes before it maps a segment (vela/inspect.py). */
_Static_assert(offsetof(vela_header, format) == 8 && offsetof(vela_header, ready) == 16,
               "the identity fields moved: tools read them at fixed offsets");
/* vela_stripe's fields must fit in its line whatever the mutex's size. */
_Static_assert(offsetof(vela_stripe, arena_bytes) + sizeof(uint64_t) <= VELA_LINE, "vela_stripe outgrew its line");
#undef VELA_LAYOUT

#endif /* VELA_TABLE_H */

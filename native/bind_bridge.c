/*
 * bind_bridge.c -- the bridge's side: the change log reader, applying remote
 * changes (last writer wins), snapshots, raw reads, partitions (counts, digests
 * for anti-entropy, drops), the cluster view.
 */
#include "bind.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

static int log_record(void *ctx, const vela_log_record *r, const uint64_t *tags, const uint8_t *key,
                      const uint8_t *value, int64_t now)
{
    PyObject *tt = bind_tags_tuple(tags, r->ntags);
    PyObject *item = tt ? Py_BuildValue("(iy#y#iLNK)", r->op, key, (Py_ssize_t)r->key_len, value,
                                        (Py_ssize_t)r->value_len, r->codec, bind_remaining(r->expire_at, now), tt,
                                        (unsigned long long)r->version) : NULL;
    int rc = item ? PyList_Append((PyObject *)ctx, item) : -1;
    Py_XDECREF(item);
    return rc;
}

/* log_read(pos, max_records) -> (records, next_pos, lapped)
 * records: [(op, key_bytes, value_bytes, codec, ttl_ns, tags, version)];
 * lapped: writers overwrote what was not read yet (resync needed). */
static PyObject *Table_log_read(TableObject *self, PyObject *args)
{
    unsigned long long pos;
    int max;
    if (!PyArg_ParseTuple(args, "Ki", &pos, &max))
        return NULL;
    READY_OR_NULL(self);
    PyObject *records = PyList_New(0);
    if (!records)
        return NULL;
    uint64_t next = pos;
    int lapped = 0;
    vela_err err = vela_log_read(&self->t, &next, max > 0 ? (uint32_t)max : 0, log_record, records, &lapped);
    if (err != VELA_OK) {
        Py_DECREF(records);
        return bind_raise(err);
    }
    if (lapped && PyList_SetSlice(records, 0, PyList_GET_SIZE(records), NULL) < 0) {
        Py_DECREF(records);
        return NULL;
    }
    return Py_BuildValue("(NKO)", records, (unsigned long long)next, lapped ? Py_True : Py_False);
}

static PyObject *Table_log_state(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    vela_header *h = self->t.hdr;
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:I}", "head",
                         (unsigned long long)__atomic_load_n(&h->log_head, __ATOMIC_ACQUIRE), "bridge_pos",
                         (unsigned long long)h->log_bridge_pos, "dropped",
                         (unsigned long long)__atomic_load_n(&h->log_dropped, __ATOMIC_ACQUIRE), "size",
                         (unsigned long long)h->log_size, "replicated", h->topology);
}

static PyObject *Table_log_commit(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    unsigned long long pos = PyLong_AsUnsignedLongLong(arg);
    if (pos == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    __atomic_store_n(&self->t.hdr->log_bridge_pos, pos, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* apply_put(key_bytes, value_bytes, codec, ttl_ns, tags, version) -> applied? */
static PyObject *Table_apply_put(TableObject *self, PyObject *args)
{
    PyObject *key, *tags;
    const char *value;
    Py_ssize_t vlen;
    int codec;
    long long ttl_ns;
    unsigned long long version;
    if (!PyArg_ParseTuple(args, "Oy#iLOK", &key, &value, &vlen, &codec, &ttl_ns, &tags, &version))
        return NULL;
    READY_OR_NULL(self);
    vela_keybuf kb;
    uint64_t taghashes[VELA_MAX_TAGS];
    Py_ssize_t ntags;
    if (bind_raw_key(key, &kb) < 0 || (ntags = bind_tag_ints(tags, taghashes)) < 0)
        return NULL;
    if (codec < 0 || codec >= VELA_CODEC_COUNT || version == 0 || ttl_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "bad codec, ttl or version");
        return NULL;
    }
    vela_put_args a = {.key = &kb.key, .value = (const uint8_t *)value, .value_len = (size_t)vlen,
                       .codec = (uint8_t)codec, .expire_at = bind_expire_at(&self->t, ttl_ns),
                       .tags = taghashes, .ntags = (size_t)ntags, .version = version};
    int applied = 0;
    vela_err err = vela_apply_put(&self->t, &a, &applied);
    return bind_result(err, PyBool_FromLong(applied));
}

/* put_if_raw(key_bytes, cond, expected_bytes, expected_codec, value_bytes, codec, ttl_ns, tags)
 * -> stored? The owner's conditional put of encoded values (cond: PUT_IF_*; the
 * expected value counts for PUT_IF_EQUAL only). */
static PyObject *Table_put_if_raw(TableObject *self, PyObject *args)
{
    PyObject *key, *tags;
    const char *value, *expected;
    Py_ssize_t vlen, xlen;
    int cond, codec, xcodec;
    long long ttl_ns;
    if (!PyArg_ParseTuple(args, "Oiy#iy#iLO", &key, &cond, &expected, &xlen, &xcodec, &value, &vlen, &codec,
                          &ttl_ns, &tags))
        return NULL;
    READY_OR_NULL(self);
    vela_keybuf kb;
    uint64_t taghashes[VELA_MAX_TAGS];
    Py_ssize_t ntags;
    if (bind_raw_key(key, &kb) < 0 || (ntags = bind_tag_ints(tags, taghashes)) < 0)
        return NULL;
    if (cond < VELA_IF_ABSENT || cond > VELA_IF_EQUAL || codec < 0 || codec >= VELA_CODEC_COUNT ||
        xcodec < 0 || xcodec >= VELA_CODEC_COUNT || ttl_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "bad condition, codec or ttl");
        return NULL;
    }
    vela_put_args a = {.key = &kb.key, .value = (const uint8_t *)value, .value_len = (size_t)vlen,
                       .codec = (uint8_t)codec, .expire_at = bind_expire_at(&self->t, ttl_ns),
                       .tags = taghashes, .ntags = (size_t)ntags};
    vela_expected x = {.value = (const uint8_t *)expected, .value_len = (size_t)xlen, .codec = (uint8_t)xcodec};
    int stored = 0;
    vela_err err = vela_put_if(&self->t, &a, (vela_put_cond)cond, cond == VELA_IF_EQUAL ? &x : NULL, &stored);
    return bind_result(err, PyBool_FromLong(stored));
}

static PyObject *Table_apply_delete(TableObject *self, PyObject *args)
{
    PyObject *key;
    unsigned long long version;
    if (!PyArg_ParseTuple(args, "OK", &key, &version))
        return NULL;
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (bind_raw_key(key, &kb) < 0)
        return NULL;
    int removed = 0;
    vela_err err = vela_apply_delete(&self->t, &kb.key, version, &removed);
    return bind_result(err, PyBool_FromLong(removed));
}

static PyObject *Table_apply_flush(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    unsigned long long version = PyLong_AsUnsignedLongLong(arg);
    if (version == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    uint64_t removed = 0;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_flush(&self->t, version, &removed);
    Py_END_ALLOW_THREADS
    vela_observe_version(&self->t, version);
    return bind_result(err, PyLong_FromUnsignedLongLong(removed));
}

/* apply_tag(tag, version, parts=0, counted=b"") -> removed: counted[p] set = count
 * the entries of partition p (hash % parts); without them every entry counts. */
static PyObject *Table_apply_tag(TableObject *self, PyObject *args)
{
    unsigned long long tag, version;
    unsigned int parts = 0;
    const char *counted = NULL;
    Py_ssize_t clen = 0;
    if (!PyArg_ParseTuple(args, "KK|Iy#", &tag, &version, &parts, &counted, &clen))
        return NULL;
    READY_OR_NULL(self);
    if (parts && (bind_check_parts(parts) < 0 || clen != (Py_ssize_t)parts)) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "apply_tag: %zd flags for %u partitions", clen, parts);
        return NULL;
    }
    uint64_t removed = 0;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_invalidate_tag_counted(&self->t, tag, version, parts, parts ? (const uint8_t *)counted : NULL,
                                      &removed);
    Py_END_ALLOW_THREADS
    vela_observe_version(&self->t, version);
    if (err != VELA_OK)
        return bind_raise(err);
    if (self->t.stats_enabled)
        vela_count(&self->t, VELA_STAT_INVALIDATIONS, 0);
    return PyLong_FromUnsignedLongLong(removed);
}

static int scan_one(void *ctx, vela_entry *e, int64_t now)
{
    uint64_t tags[VELA_MAX_TAGS];
    for (uint32_t i = 0; i < e->ntags; i++)
        tags[i] = vela_tags_of(e)[i].tag;
    PyObject *tt = bind_tags_tuple(tags, e->ntags);
    PyObject *item = tt ? Py_BuildValue("(y#y#iLNK)", vela_key_of(e), (Py_ssize_t)e->key_len, vela_value_of(e),
                                        (Py_ssize_t)e->value_len, e->codec, bind_remaining(e->expire_at, now), tt,
                                        (unsigned long long)e->version) : NULL;
    int rc = item ? PyList_Append((PyObject *)ctx, item) : -1;
    Py_XDECREF(item);
    return rc;
}

/* scan(cursor, max) -> (next_cursor or None, [(key_bytes, value_bytes, codec, ttl_ns, tags, version)]) */
static PyObject *Table_scan(TableObject *self, PyObject *args)
{
    unsigned long long cursor;
    unsigned int max;
    if (!PyArg_ParseTuple(args, "KI", &cursor, &max))
        return NULL;
    READY_OR_NULL(self);
    PyObject *items = PyList_New(0);
    if (!items)
        return NULL;
    uint64_t c = cursor;
    vela_err err = vela_scan(&self->t, &c, max, scan_one, items);
    if (err != VELA_OK) {
        Py_DECREF(items);
        return PyErr_Occurred() ? NULL : bind_raise(err);
    }
    if (c == UINT64_MAX)
        return Py_BuildValue("(ON)", Py_None, items);
    return Py_BuildValue("(KN)", (unsigned long long)c, items);
}

static int raw_entry(void *ctx, vela_entry *e, int64_t now)
{
    uint64_t tags[VELA_MAX_TAGS];
    for (uint32_t i = 0; i < e->ntags; i++)
        tags[i] = vela_tags_of(e)[i].tag;
    PyObject *tt = bind_tags_tuple(tags, e->ntags);
    *(PyObject **)ctx = tt ? Py_BuildValue("(y#iLNK)", vela_value_of(e), (Py_ssize_t)e->value_len, e->codec,
                                           bind_remaining(e->expire_at, now), tt, (unsigned long long)e->version)
                           : NULL;
    return *(PyObject **)ctx ? 0 : -1;
}

/* get_raw(key_bytes) -> None | (value_bytes, codec, remaining_ns, tags,
 * version): the bridge's read. Nothing is decoded (a bridge never unpickles); remaining_ns 0
 * means "never expires". Counts a hit or a miss. */
static PyObject *Table_get_raw(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get_raw(key_bytes, count=True)");
        return NULL;
    }
    PyObject *key = args[0];
    int count = nargs < 2 || PyObject_IsTrue(args[1]);
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (bind_raw_key(key, &kb) < 0)
        return NULL;
    vela_table *t = &self->t;
    PyObject *out = NULL;
    int found = 0;
    vela_err err = vela_with_entry(t, &kb.key, raw_entry, &out, &found);
    if (err != VELA_OK)
        return err == VELA_ECALLER ? NULL : bind_raise(err);
    if (count) /* (the bridge's own bookkeeping reads are no lookups) */
        VELA_COUNT(t, found ? VELA_STAT_HITS : VELA_STAT_MISSES);
    if (!found)
        Py_RETURN_NONE;
    return out;
}

static PyObject *Table_next_version(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    return PyLong_FromUnsignedLongLong(vela_next_version(&self->t));
}

/* set_cluster(json_bytes): the bridge publishes the cluster view. */
static PyObject *Table_set_cluster(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    size_t most = sizeof self->t.cluster->json;
    if (!PyBytes_Check(arg) || (size_t)PyBytes_GET_SIZE(arg) > most) {
        PyErr_Format(PyExc_ValueError, "the cluster view is bytes of at most %zu", most);
        return NULL;
    }
    vela_err err = vela_cluster_publish(&self->t, PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg));
    return bind_result(err, Py_NewRef(Py_None));
}

/* cluster() -> bytes of the view (b"" when no bridge ever wrote one). */
static PyObject *Table_cluster(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    static char json[VELA_CLUSTER_BYTES]; /* the interpreter lock serialises its use */
    size_t len = vela_cluster_read(&self->t, json);
    return PyBytes_FromStringAndSize(json, (Py_ssize_t)len);
}

/* cluster_seq() -> int: changes whenever the bridge writes a new view (cheap:
 * a worker re-reads the view only when it moved). */
static PyObject *Table_cluster_seq(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    return PyLong_FromUnsignedLong(vela_cluster_seq(&self->t));
}

/* The partition of an entry: the ring's partition_of (vela/ring.py) over the
 * hash the entry keeps of its encoded key, as vela_drop_partitions takes it. */
static inline uint32_t partition_of_entry(const vela_entry *e, uint32_t parts)
{
    return (uint32_t)(e->hash % parts);
}

/* The `parts` argument of a per-partition method; 0, or -1 with the exception. */
static int parts_arg(PyObject *arg, uint32_t *parts)
{
    unsigned long n = PyLong_AsUnsignedLong(arg);
    if ((n == (unsigned long)-1 && PyErr_Occurred()) || bind_check_parts((unsigned int)n) < 0)
        return -1;
    *parts = (uint32_t)n;
    return 0;
}

/* One pass over the whole table (every stripe, each under its lock in turn), with
 * the interpreter released: `fn` must not touch Python objects. */
static vela_err scan_all(TableObject *self, vela_scan_fn fn, void *ctx)
{
    uint64_t cursor = 0;
    vela_err err = VELA_OK;
    Py_BEGIN_ALLOW_THREADS
    while (cursor != UINT64_MAX && err == VELA_OK)
        err = vela_scan(&self->t, &cursor, 1u << 16, fn, ctx);
    Py_END_ALLOW_THREADS
    return err;
}

typedef struct { uint32_t parts; uint64_t *counts; } partition_count_ctx;

static int count_one(void *ctx, vela_entry *e, int64_t Py_UNUSED(now))
{
    partition_count_ctx *c = ctx;
    if (e->codec != VELA_CODEC_TOMBSTONE)
        c->counts[partition_of_entry(e, c->parts)]++;
    return 0;
}

/* partition_counts(parts) -> [live entries of each partition (hash % parts)] */
static PyObject *Table_partition_counts(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    uint32_t parts;
    if (parts_arg(arg, &parts) < 0)
        return NULL;
    partition_count_ctx c = {parts, calloc(parts, sizeof(uint64_t))};
    if (!c.counts)
        return PyErr_NoMemory();
    vela_err err = scan_all(self, count_one, &c);
    PyObject *out = err == VELA_OK ? PyList_New((Py_ssize_t)parts) : NULL;
    for (uint32_t i = 0; out && i < parts; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(c.counts[i]);
        if (!v)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, v);
    }
    free(c.counts);
    return err == VELA_OK ? out : bind_raise(err);
}

/* Anti-entropy (vela/bridge/partitions.py): digests of each partition that two
 * hosts holding the same entries compute alike, whatever order their tables keep
 * them in -- the sum (mod 2^64) of a hash of each live entry's key and version.
 * Not counted: tombstones (kept for a while, not contents), and entries that
 * expire within a margin (gone, or about to go, on one host and not yet on the
 * other). Two margins, two digests: an entry that crosses a margin between the
 * moments two hosts compute changes one of them; a difference of contents that
 * lasts changes both. */
typedef struct {
    uint32_t parts;
    int64_t margin[2];
    uint64_t (*sums)[4]; /* per partition: entries, digest past margin[0]; the same past margin[1] */
} partition_digest_ctx;

static int digest_one(void *ctx, vela_entry *e, int64_t now)
{
    partition_digest_ctx *c = ctx;
    if (e->codec == VELA_CODEC_TOMBSTONE)
        return 0;
    uint64_t *sums = c->sums[partition_of_entry(e, c->parts)];
    uint64_t h = XXH3_64bits_withSeed(&e->version, sizeof e->version, e->hash); /* (key, version) */
    for (int i = 0; i < 2; i++)
        if (e->expire_at == 0 || e->expire_at - now > c->margin[i]) {
            sums[2 * i]++;
            sums[2 * i + 1] += h;
        }
    return 0;
}

/* partition_digests(parts, margin_ns, far_margin_ns) -> [(entries, digest, entries_far,
 * digest_far)] for each partition (hash % parts), of the live entries that expire past
 * each margin (or never); one scan of the table. */
static PyObject *Table_partition_digests(TableObject *self, PyObject *args)
{
    PyObject *parts_obj;
    long long margin, far;
    if (!PyArg_ParseTuple(args, "OLL", &parts_obj, &margin, &far))
        return NULL;
    READY_OR_NULL(self);
    uint32_t parts;
    if (parts_arg(parts_obj, &parts) < 0)
        return NULL;
    if (margin < 0 || far < 0) {
        PyErr_Format(PyExc_ValueError, "partition_digests: margins must be >= 0 ns, not %lld and %lld", margin,
                     far);
        return NULL;
    }
    partition_digest_ctx c = {parts, {(int64_t)margin, (int64_t)far}, calloc(parts, sizeof *c.sums)};
    if (!c.sums)
        return PyErr_NoMemory();
    PyObject *out = NULL;
    vela_err err = scan_all(self, digest_one, &c);
    if (err != VELA_OK) {
        bind_raise(err);
        goto done;
    }
    out = PyList_New((Py_ssize_t)parts);
    for (uint32_t i = 0; out && i < parts; i++) {
        const uint64_t *s = c.sums[i];
        PyObject *item = Py_BuildValue("(KKKK)", (unsigned long long)s[0], (unsigned long long)s[1],
                                       (unsigned long long)s[2], (unsigned long long)s[3]);
        if (!item)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
done:
    free(c.sums);
    return out;
}

/* drop_partitions(parts, drop_bytes) -> removed: drop_bytes[p] != 0 drops partition p. */
static PyObject *Table_drop_partitions(TableObject *self, PyObject *args)
{
    unsigned int parts;
    const char *drop;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "Iy#", &parts, &drop, &len))
        return NULL;
    READY_OR_NULL(self);
    if (bind_check_parts(parts) < 0)
        return NULL;
    if ((Py_ssize_t)parts != len) {
        PyErr_Format(PyExc_ValueError, "drop_partitions: %zd flags for %u partitions", len, parts);
        return NULL;
    }
    uint64_t removed = 0;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_drop_partitions(&self->t, parts, (const uint8_t *)drop, &removed);
    Py_END_ALLOW_THREADS
    return bind_result(err, PyLong_FromUnsignedLongLong(removed));
}

PyMethodDef bind_bridge_methods[] = {
    {"log_read", (PyCFunction)Table_log_read, METH_VARARGS, "bridge: log_read(pos, max)"},
    {"log_state", (PyCFunction)Table_log_state, METH_NOARGS, "bridge: change log positions"},
    {"log_commit", (PyCFunction)Table_log_commit, METH_O, "bridge: log_commit(pos)"},
    {"apply_put", (PyCFunction)Table_apply_put, METH_VARARGS, "bridge: last-writer-wins put"},
    {"put_if_raw", (PyCFunction)Table_put_if_raw, METH_VARARGS,
     "bridge: put_if_raw(key, cond, expected, expected_codec, value, codec, ttl_ns, tags) -> stored?"},
    {"apply_delete", (PyCFunction)Table_apply_delete, METH_VARARGS, "bridge: apply_delete(key, version)"},
    {"apply_flush", (PyCFunction)Table_apply_flush, METH_O, "bridge: apply_flush(version) -> removed"},
    {"apply_tag", (PyCFunction)Table_apply_tag, METH_VARARGS, "bridge: apply_tag(tag, version) -> removed"},
    {"scan", (PyCFunction)Table_scan, METH_VARARGS, "bridge: scan(cursor, max) for snapshots"},
    {"get_raw", (PyCFunction)(void (*)(void))Table_get_raw, METH_FASTCALL, "bridge: get_raw(key_bytes) -> None | (bytes, codec, ttl_ns, tags, version)"},
    {"partition_counts", (PyCFunction)Table_partition_counts, METH_O, "partition_counts(parts) -> [entries]"},
    {"partition_digests", (PyCFunction)Table_partition_digests, METH_VARARGS,
     "partition_digests(parts, margin_ns, far_margin_ns) -> [(entries, digest, entries_far, digest_far)]"},
    {"drop_partitions", (PyCFunction)Table_drop_partitions, METH_VARARGS, "drop_partitions(parts, flags) -> removed"},
    {"next_version", (PyCFunction)Table_next_version, METH_NOARGS, "a new version (HLC)"},
    {"set_cluster", (PyCFunction)Table_set_cluster, METH_O, "bridge: publish the cluster view"},
    {"cluster", (PyCFunction)Table_cluster, METH_NOARGS, "the cluster view (bytes)"},
    {"cluster_seq", (PyCFunction)Table_cluster_seq, METH_NOARGS, "changes with every new view"},
    {NULL, NULL, 0, NULL},
};

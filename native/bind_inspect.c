/*
 * bind_inspect.c -- counters, header figures, the integrity check, and the
 * lock-free views tools/inspect_shm.py reads (inspect.c); rebuild and sync.
 */
#include "bind.h"

static const char *const stat_names[VELA_STAT_COUNT] = {
    "hits", "misses", "writes", "deletes", "evictions", "expirations", "invalidations",
    "fetches", "stampede_waits", "stampede_timeouts", "lock_recoveries",
};

/* bump(name, n=1): add to one of this process's counters (Python-level events
 * such as fetches and stampede waits). */
static PyObject *Table_bump(TableObject *self, PyObject *args)
{
    const char *name;
    unsigned long long n = 1;
    if (!PyArg_ParseTuple(args, "s|K", &name, &n))
        return NULL;
    READY_OR_NULL(self);
    for (int i = 0; i < VELA_STAT_COUNT; i++)
        if (strcmp(name, stat_names[i]) == 0) {
            if (self->t.stats_enabled)
                vela_count(&self->t, (enum vela_stat)i, n);
            Py_RETURN_NONE;
        }
    PyErr_Format(PyExc_ValueError, "no counter named %s", name);
    return NULL;
}

static PyObject *Table_stats(TableObject *self, PyObject *args)
{
    int reset = 0;
    if (!PyArg_ParseTuple(args, "|p", &reset))
        return NULL;
    READY_OR_NULL(self);
    uint64_t c[VELA_STAT_COUNT];
    vela_stats_sum(&self->t, c);
    if (reset)
        vela_stats_reset(&self->t);
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < VELA_STAT_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(c[i]);
        if (!v || PyDict_SetItemString(d, stat_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

/* Header fields and memory figures (the options that were agreed, for the
 * Python layer and tools/inspect_shm.py). */
static PyObject *Table_info(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    vela_header *h = self->t.hdr;
    static const char *const evictions[] = {"lru", "lfu", "ttl_only"};
    return Py_BuildValue(
        "{s:I,s:s,s:K,s:I,s:I,s:I,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:L,s:I,s:I,s:k,s:I,s:I,s:I}",
        "format", h->format, "eviction_policy", evictions[h->eviction % 3],
        "capacity", (unsigned long long)h->capacity, "stripes", h->stripes, "buckets_per_stripe", h->buckets,
        "tag_buckets_per_stripe", h->tagbuckets, "max_size", (unsigned long long)h->max_size,
        "max_entry_size", (unsigned long long)h->max_entry_size, "heap_bytes",
        (unsigned long long)(h->heap_end - h->heap_off), "memory_used",
        (unsigned long long)__atomic_load_n(&h->heap.used_bytes, __ATOMIC_RELAXED), "spare_bytes",
        (unsigned long long)vela_arena_spare_bytes(&self->t), "entries",
        (unsigned long long)vela_size(&self->t), "index_bytes", (unsigned long long)h->heap_off,
        "created_ns", (long long)h->created_ns, "backend", h->backend, "sweeper_pid", h->sweeper_pid,
        "version_clock", (unsigned long)h->version_clock, "poisoned", h->poisoned,
        "heap_lock_holder", h->heap.lock.holder_pid, "leases_held", vela_leases_held(&self->t));
}

static PyObject *Table_check(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    vela_report r = {0};
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_check(&self->t, &r);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK) {
        vela_report_free(&r);
        return bind_raise(err);
    }
    PyObject *list = PyList_New(0);
    for (size_t i = 0; list && i < r.count; i++) {
        PyObject *line = PyUnicode_FromString(r.lines[i]);
        if (!line || PyList_Append(list, line) < 0)
            Py_CLEAR(list);
        Py_XDECREF(line);
    }
    vela_report_free(&r);
    return list;
}

/* stripes_info() -> [(entries, bytes, seq, lock_holder_pid, recoveries)], without locking. */
static PyObject *Table_stripes_info(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    PyObject *list = PyList_New(self->t.stripe_mask + 1);
    for (uint32_t s = 0; list && s <= self->t.stripe_mask; s++) {
        vela_stripe_snapshot_t snap;
        vela_stripe_snapshot(&self->t, s, &snap);
        PyObject *item = Py_BuildValue("(KKIII)", (unsigned long long)snap.entries,
                                       (unsigned long long)snap.bytes, snap.seq, snap.holder_pid,
                                       snap.recoveries);
        if (!item)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, s, item);
    }
    return list;
}

/* leases_info() -> [(stripe, slot, hash, holder_pid, holder_start, age_s)], without locking. */
static PyObject *Table_leases_info(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    PyObject *list = PyList_New(0);
    int64_t now = vela_monotonic_ns();
    uint32_t n = (self->t.stripe_mask + 1) * VELA_LEASES_PER_STRIPE;
    for (uint32_t i = 0; list && i < n; i++) {
        vela_lease l;
        if (!vela_lease_snapshot(&self->t, i, &l))
            continue;
        PyObject *item = Py_BuildValue("(IIKIKd)", i / VELA_LEASES_PER_STRIPE, i % VELA_LEASES_PER_STRIPE,
                                       (unsigned long long)l.hash, l.holder_pid,
                                       (unsigned long long)l.holder_start, (now - l.since_ns) / 1e9);
        if (!item || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
    }
    return list;
}

static int sample_one(void *ctx, vela_entry *e, int64_t now)
{
    PyObject *key = vela_decode_key(vela_key_of(e), e->key_len);
    if (!key) { /* show what cannot be decoded as bytes */
        PyErr_Clear();
        key = PyBytes_FromStringAndSize((const char *)vela_key_of(e), e->key_len);
    }
    PyObject *ttl = e->expire_at ? PyFloat_FromDouble((e->expire_at - now) / 1e9) : Py_NewRef(Py_None);
    PyObject *item = key && ttl ? Py_BuildValue("(OIOii)", key, e->value_len, ttl, e->codec, e->ntags) : NULL;
    Py_XDECREF(key);
    Py_XDECREF(ttl);
    int rc = item ? PyList_Append((PyObject *)ctx, item) : -1;
    Py_XDECREF(item);
    return rc;
}

/* sample(max) -> ([(key, value_len, ttl_s or None, codec, ntags)], [busy stripes]).
 * Try-locks each stripe; a stripe someone holds is skipped and listed. */
static PyObject *Table_sample(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    long max = PyLong_AsLong(arg);
    if (max < 0 && PyErr_Occurred())
        return NULL;
    PyObject *items = PyList_New(0), *busy = PyList_New(0);
    if (!items || !busy)
        goto fail;
    for (uint32_t s = 0; s <= self->t.stripe_mask && PyList_GET_SIZE(items) < max; s++) {
        int n = vela_sample_stripe(&self->t, s, (uint32_t)(max - PyList_GET_SIZE(items)), sample_one, items);
        if (n == -2)
            goto fail;
        if (n == -1) {
            PyObject *idx = PyLong_FromUnsignedLong(s);
            if (!idx || PyList_Append(busy, idx) < 0) {
                Py_XDECREF(idx);
                goto fail;
            }
            Py_DECREF(idx);
        }
    }
    return Py_BuildValue("(NN)", items, busy);
fail:
    Py_XDECREF(items);
    Py_XDECREF(busy);
    return NULL;
}

/* rebuild() -> (kept, dropped): see rebuild.c; only with the table to ourselves. */
static PyObject *Table_rebuild(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    uint64_t kept = 0, dropped = 0;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_rebuild(&self->t, &kept, &dropped);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK)
        return bind_raise(err);
    vela_stats_attach(&self->t); /* the slots were cleared */
    return Py_BuildValue("(KK)", (unsigned long long)kept, (unsigned long long)dropped);
}

static PyObject *Table_sync(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_sync(&self->t);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK)
        return bind_raise(err);
    Py_RETURN_NONE;
}

PyMethodDef bind_inspect_methods[] = {
    {"bump", (PyCFunction)Table_bump, METH_VARARGS, "bump(counter, n=1)"},
    {"stats", (PyCFunction)Table_stats, METH_VARARGS, "stats(reset=False) -> dict of counters"},
    {"info", (PyCFunction)Table_info, METH_NOARGS, "info() -> dict of header fields"},
    {"check", (PyCFunction)Table_check, METH_NOARGS, "check() -> list of problems ([] = sound)"},
    {"stripes_info", (PyCFunction)Table_stripes_info, METH_NOARGS, "per-stripe figures, lock-free"},
    {"leases_info", (PyCFunction)Table_leases_info, METH_NOARGS, "stampede leases held, lock-free"},
    {"sample", (PyCFunction)Table_sample, METH_O, "sample(max) -> (entries, busy stripes)"},
    {"rebuild", (PyCFunction)Table_rebuild, METH_NOARGS, "rebuild() -> (kept, dropped)"},
    {"sync", (PyCFunction)Table_sync, METH_NOARGS, "sync(): msync the mapping"},
    {NULL, NULL, 0, NULL},
};

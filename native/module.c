/*
 * module.c -- the CPython binding of the C core: the Table type, argument
 * parsing, and the one place where C errors become Python exceptions.
 * The work itself lives in the other files of native/.
 */
#include "binding.h"

#include <pthread.h>
#include <unistd.h>

/* ---- C errors -> Python exceptions (the only place) ---------------------- */

static PyObject *errors_module;

static PyObject *error_class(vela_err err)
{
    static const char *const names[VELA_ERR_COUNT] = {
        [VELA_EFULL] = "CacheFull",         [VELA_ETOOLARGE] = "ValueTooLarge",
        [VELA_ELAYOUT] = "LayoutMismatch",  [VELA_EPOISONED] = "SegmentCorrupt",
        [VELA_EFORMAT] = "LayoutMismatch",
        [VELA_ECORRUPT] = "SegmentCorrupt", [VELA_ETIMEOUT] = "LockTimeout",
        [VELA_EINVAL] = "OptionError",      [VELA_ESYS] = "VelaError",
    };
    if (err == VELA_ENOTINT)
        return PyExc_TypeError;
    if (err == VELA_EOVERFLOW)
        return PyExc_OverflowError;
    if (!errors_module && !(errors_module = PyImport_ImportModule("vela.errors")))
        return NULL;
    const char *name = (err > 0 && err < VELA_ERR_COUNT && names[err]) ? names[err] : "VelaError";
    PyObject *cls = PyObject_GetAttrString(errors_module, name);
    if (cls)
        Py_DECREF(cls); /* the module keeps it alive */
    return cls;
}

/* Raise the exception for err with this thread's message; Vela's own
 * exceptions also carry the symbol as `.code` ("VELA_EFULL"). */
static PyObject *raise_vela(vela_err err)
{
    PyObject *cls = error_class(err);
    if (!cls)
        return NULL;
    PyObject *exc = PyObject_CallFunction(cls, "s", vela_last_message());
    if (!exc)
        return NULL;
    PyObject *code = PyUnicode_FromString(vela_err_name(err));
    if (!code || PyObject_SetAttrString(exc, "code", code) < 0)
        PyErr_Clear(); /* the message names the code too */
    Py_XDECREF(code);
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
    return NULL;
}

/* Waits give the interpreter lock up (lock.c calls these). */
void *vela_wait_begin(void)
{
    return PyGILState_Check() ? (void *)PyEval_SaveThread() : NULL;
}

void vela_wait_end(void *token)
{
    if (token)
        PyEval_RestoreThread((PyThreadState *)token);
}

/* After fork() a child counts in a stats slot of its own. */
static uint64_t fork_generation;
static void after_fork_in_child(void) { fork_generation++; }

/* ---- the Table type -------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vela_table t;
    int open;
    uint64_t fork_generation;
    PyObject *dumps;
    int dumps_codec;
    PyObject *loaders[VELA_CODEC_COUNT];
} TableObject;

static int ready(TableObject *self)
{
    if (!self->open) {
        PyObject *cls = error_class(VELA_OK);
        if (cls) {
            PyObject *closed = PyObject_GetAttrString(errors_module, "CacheClosed");
            PyErr_SetString(closed ? closed : cls, "the cache handle is closed");
            Py_XDECREF(closed);
        }
        return 0;
    }
    if (self->fork_generation != fork_generation) {
        vela_stats_attach(&self->t);
        self->fork_generation = fork_generation;
    }
    return 1;
}

#define READY_OR_NULL(self) do { if (!ready(self)) return NULL; } while (0)

static void table_release(TableObject *self)
{
    if (self->open) {
        vela_close(&self->t);
        self->open = 0;
    }
}

static void Table_dealloc(TableObject *self)
{
    table_release(self);
    Py_CLEAR(self->dumps);
    for (int i = 0; i < VELA_CODEC_COUNT; i++)
        Py_CLEAR(self->loaders[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Table(fd, backend, capacity, stripes, max_size, max_entry_size, eviction,
 *       dumps, dumps_codec, loaders, lock_fd=fd, reinit_unready=True):
 * -1 for a layout option means "adopt"; lock_fd -1: the caller serialises opens. */
static int Table_init(TableObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "backend", "capacity", "stripes", "max_size", "max_entry_size",
                             "eviction", "dumps", "dumps_codec", "loaders", "lock_fd",
                             "reinit_unready", "replicated", NULL};
    int fd, backend, dumps_codec, lock_fd = -2, reinit = 1, replicated = -1;
    vela_options o;
    PyObject *dumps, *loaders;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiLLLLLOiO|ipi", kwlist, &fd, &backend, &o.capacity,
                                     &o.stripes, &o.max_size, &o.max_entry_size, &o.eviction, &dumps,
                                     &dumps_codec, &loaders, &lock_fd, &reinit, &replicated))
        return -1;
    o.replicated = replicated;
    if (lock_fd == -2)
        lock_fd = fd;
    o.reinit_unready = reinit;
    if (self->open) {
        PyErr_SetString(PyExc_RuntimeError, "Table is already open");
        return -1;
    }
    if (!PyDict_Check(loaders)) {
        PyErr_SetString(PyExc_TypeError, "loaders must be a dict codec -> callable");
        return -1;
    }
    o.backend = backend;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_open(fd, lock_fd, &o, &self->t);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK) {
        raise_vela(err);
        return -1;
    }
    self->open = 1;
    self->fork_generation = fork_generation;
    Py_INCREF(dumps);
    Py_XSETREF(self->dumps, dumps);
    self->dumps_codec = dumps_codec;
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(loaders, &pos, &k, &v)) {
        long c = PyLong_AsLong(k);
        if (c >= VELA_CODEC_PICKLE && c < VELA_CODEC_COUNT) {
            Py_INCREF(v);
            Py_XSETREF(self->loaders[c], v);
        }
    }
    return 0;
}

static PyObject *read_and_unlock(TableObject *self, uint32_t s, uint32_t ref);

/* Find `k` and, with `value`, decode it: first without the lock (read.c),
 * under the stripe lock when that cannot settle it. 1 found, 0 absent,
 * -1 error. count: 0 nothing, 1 a hit or a miss, 2 only a hit. */
static int lookup(TableObject *self, const vela_key *k, PyObject **value, int count)
{
    vela_table *t = &self->t;
    uint32_t s = vela_stripe_of(t, k->hash), ref = 0;
    vela_view view;
    int found = -1;
    for (int attempt = 0; attempt < 3 && found < 0; attempt++) {
        uint32_t seq = vela_read_begin(t, s);
        if (seq & 1)
            continue;
        vela_read_result r = vela_find_unlocked(t, s, k, &view);
        if (r == VELA_READ_LOCKED)
            break;
        if (r == VELA_READ_RETRY)
            continue;
        if (r == VELA_READ_ABSENT || !value) {
            if (vela_read_valid(t, s, seq))
                found = r == VELA_READ_FOUND;
            continue;
        }
        PyObject *raw = vela_decode_raw(view.codec, view.value, view.value_len);
        if (!vela_read_valid(t, s, seq)) { /* torn copy: throw it away */
            if (raw)
                Py_DECREF(raw);
            else
                PyErr_Clear();
            continue;
        }
        if (!raw)
            return -1;
        if (count)
            VELA_COUNT(t, VELA_STAT_HITS);
        *value = vela_decode_finish(view.codec, raw, self->loaders);
        return *value ? 1 : -1;
    }
    if (found < 0) {
        vela_err err = vela_stripe_lock(t, s);
        if (err != VELA_OK) {
            raise_vela(err);
            return -1;
        }
        ref = vela_find(t, s, k);
        found = ref != 0;
        if (found && value) {
            if (count)
                VELA_COUNT(t, VELA_STAT_HITS);
            *value = read_and_unlock(self, s, ref);
            return *value ? 1 : -1;
        }
        vela_stripe_unlock(t, s);
    }
    if (count == 1 || (count && found))
        VELA_COUNT(t, found ? VELA_STAT_HITS : VELA_STAT_MISSES);
    return found;
}

/* get(key, default=None): the arguments as Cache.get takes them (FASTCALL|KEYWORDS). */
static PyObject *get_counting(TableObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames, int count)
{
    PyObject *key = nargs > 0 ? args[0] : NULL, *dflt = nargs > 1 ? args[1] : Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, i));
        if (name && strcmp(name, "default") == 0 && nargs < 2)
            dflt = args[nargs + i];
        else if (name && strcmp(name, "key") == 0 && nargs < 1)
            key = args[nargs + i];
        else {
            PyErr_Format(PyExc_TypeError, "get() got an unexpected keyword argument '%s'", name ? name : "?");
            return NULL;
        }
    }
    if (!key || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    PyObject *value = NULL;
    int found = lookup(self, &kb.key, &value, count);
    if (found < 0)
        return NULL;
    if (found)
        return value;
    Py_INCREF(dflt);
    return dflt;
}

/* get(key, default=None): the hot path. Hash, read the stripe, copy. */
static PyObject *Table_get(TableObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return get_counting(self, args, nargs, kwnames, 1);
}

/* get_hit(key, default): get that counts a hit but not a miss (get_or_fetch's
 * lock-free first look; its slow path counts the miss). */
static PyObject *Table_get_hit(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return get_counting(self, args, nargs, NULL, 2);
}

static PyObject *Table_contains(TableObject *self, PyObject *key)
{
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    int found = lookup(self, &kb.key, NULL, 0);
    return found < 0 ? NULL : PyBool_FromLong(found);
}

static int64_t expire_at_for(vela_table *t, long long ttl_ns)
{
    return ttl_ns > 0 ? vela_now(t) + ttl_ns : 0;
}

/* put(key, value, ttl_ns=0, tags=None): ttl_ns 0 = never expires. */
static PyObject *Table_put(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "put(key, value, ttl_ns=0, tags=None)");
        return NULL;
    }
    READY_OR_NULL(self);
    long long ttl_ns = 0;
    if (nargs > 2 && (ttl_ns = PyLong_AsLongLong(args[2])) == -1 && PyErr_Occurred())
        return NULL;
    uint64_t tags[VELA_MAX_TAGS];
    Py_ssize_t ntags = vela_encode_tags(nargs > 3 ? args[3] : NULL, tags);
    if (ntags < 0)
        return NULL;
    vela_keybuf kb;
    if (vela_encode_key(args[0], &kb) < 0)
        return NULL;
    vela_valbuf vb;
    if (vela_encode_value(args[1], self->dumps, self->dumps_codec, &vb) < 0)
        return NULL;
    vela_put_args a = {.key = &kb.key, .value = vb.bytes, .value_len = vb.len, .codec = vb.codec,
                       .expire_at = expire_at_for(&self->t, ttl_ns), .tags = tags, .ntags = (size_t)ntags};
    vela_err err = vela_put(&self->t, &a);
    vela_valbuf_release(&vb);
    if (err != VELA_OK)
        return raise_vela(err);
    Py_RETURN_NONE;
}

/* Decode the entry at `ref` of the locked stripe s, unlock, finish decoding. */
static PyObject *read_and_unlock(TableObject *self, uint32_t s, uint32_t ref)
{
    vela_table *t = &self->t;
    vela_block *b = (vela_block *)vela_at(t, ref);
    vela_entry *e = vela_entry_of(b);
    vela_mark_access(t, b);
    uint8_t codec = e->codec;
    PyObject *raw = vela_decode_raw(codec, vela_value_of(e), e->value_len);
    vela_stripe_unlock(t, s);
    return vela_decode_finish(codec, raw, self->loaders);
}

/* fetch_begin(key, budget_ns, poll_ns) -> (status, value, token, waited)
 * status 0: hit (value); 1: this process fetches (token); 2: waited the whole
 * budget; 3: fetch without a lease; 4: busy (budget 0). See lease.c. */
static PyObject *Table_fetch_begin(TableObject *self, PyObject *args)
{
    PyObject *key;
    long long budget_ns, poll_ns;
    if (!PyArg_ParseTuple(args, "OLL", &key, &budget_ns, &poll_ns))
        return NULL;
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    vela_fetch_status status;
    vela_lease_token token;
    uint32_t ref = 0;
    int waited = 0;
    vela_err err = vela_fetch_begin(&self->t, &kb.key, budget_ns, poll_ns, &status, &ref, &token, &waited);
    if (err != VELA_OK)
        return raise_vela(err);
    if (waited)
        VELA_COUNT(&self->t, VELA_STAT_STAMPEDE_WAITS);
    if (status == VELA_FETCH_HIT) {
        VELA_COUNT(&self->t, VELA_STAT_HITS);
        PyObject *value = read_and_unlock(self, token.stripe, ref);
        if (!value)
            return NULL;
        return Py_BuildValue("(iNOO)", (int)status, value, Py_None, waited ? Py_True : Py_False);
    }
    if (status == VELA_FETCH_BUSY)
        return Py_BuildValue("(iOOO)", (int)status, Py_None, Py_None, Py_False);
    VELA_COUNT(&self->t, VELA_STAT_MISSES);
    if (status == VELA_FETCH_TIMEOUT)
        VELA_COUNT(&self->t, VELA_STAT_STAMPEDE_TIMEOUTS);
    if (status != VELA_FETCH_MINE)
        return Py_BuildValue("(iOOO)", (int)status, Py_None, Py_None, waited ? Py_True : Py_False);
    return Py_BuildValue("(iO(IIK)O)", (int)status, Py_None, token.stripe, token.slot,
                         (unsigned long long)token.hash, waited ? Py_True : Py_False);
}

static int parse_token(PyObject *obj, vela_lease_token *token)
{
    unsigned long long hash;
    if (!PyArg_ParseTuple(obj, "IIK", &token->stripe, &token->slot, &hash))
        return -1;
    token->hash = hash;
    return 0;
}

/* fetch_complete(token, key, value, ttl_ns, tags): store and release the lease. */
static PyObject *Table_fetch_complete(TableObject *self, PyObject *args)
{
    PyObject *tok, *key, *value, *tags;
    long long ttl_ns;
    if (!PyArg_ParseTuple(args, "OOOLO", &tok, &key, &value, &ttl_ns, &tags))
        return NULL;
    READY_OR_NULL(self);
    vela_lease_token token;
    vela_keybuf kb;
    vela_valbuf vb;
    uint64_t taghashes[VELA_MAX_TAGS];
    Py_ssize_t ntags;
    if (parse_token(tok, &token) < 0)
        return NULL;
    if ((ntags = vela_encode_tags(tags, taghashes)) < 0 || vela_encode_key(key, &kb) < 0 ||
        vela_encode_value(value, self->dumps, self->dumps_codec, &vb) < 0) {
        /* the value cannot be stored: release the lease so waiters fetch */
        PyObject *type, *val, *tb;
        PyErr_Fetch(&type, &val, &tb);
        vela_fetch_complete(&self->t, &token, NULL);
        PyErr_Restore(type, val, tb);
        return NULL;
    }
    vela_put_args a = {.key = &kb.key, .value = vb.bytes, .value_len = vb.len, .codec = vb.codec,
                       .expire_at = expire_at_for(&self->t, ttl_ns), .tags = taghashes,
                       .ntags = (size_t)ntags};
    vela_err err = vela_fetch_complete(&self->t, &token, &a);
    vela_valbuf_release(&vb);
    if (err != VELA_OK)
        return raise_vela(err);
    Py_RETURN_NONE;
}

static PyObject *Table_fetch_abort(TableObject *self, PyObject *tok)
{
    READY_OR_NULL(self);
    vela_lease_token token;
    if (parse_token(tok, &token) < 0)
        return NULL;
    vela_err err = vela_fetch_complete(&self->t, &token, NULL);
    if (err != VELA_OK)
        return raise_vela(err);
    Py_RETURN_NONE;
}

static PyObject *Table_release_leases(TableObject *self, PyObject *pid)
{
    READY_OR_NULL(self);
    long p = PyLong_AsLong(pid);
    if (p == -1 && PyErr_Occurred())
        return NULL;
    uint32_t n;
    Py_BEGIN_ALLOW_THREADS
    n = vela_leases_release_pid(&self->t, (uint32_t)p);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(n);
}

/* get_many(keys) -> {key: value} for the keys present (one call, a lock per key). */
static PyObject *Table_get_many(TableObject *self, PyObject *keys)
{
    READY_OR_NULL(self);
    PyObject *seq = PySequence_Fast(keys, "get_many takes an iterable of keys");
    if (!seq)
        return NULL;
    PyObject *out = PyDict_New();
    for (Py_ssize_t i = 0; out && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(seq, i);
        vela_keybuf kb;
        if (vela_encode_key(key, &kb) < 0) {
            Py_CLEAR(out);
            break;
        }
        PyObject *value = NULL;
        int found = lookup(self, &kb.key, &value, 1);
        if (found < 0 || (found && PyDict_SetItem(out, key, value) < 0))
            Py_CLEAR(out);
        Py_XDECREF(value);
    }
    Py_DECREF(seq);
    return out;
}

/* put_many(items, ttl_ns, tags): items is a sequence of (key, value). Every
 * item is encoded before the first is stored, so a bad one stores nothing. */
static PyObject *Table_put_many(TableObject *self, PyObject *args)
{
    PyObject *items, *tags;
    long long ttl_ns;
    if (!PyArg_ParseTuple(args, "OLO", &items, &ttl_ns, &tags))
        return NULL;
    READY_OR_NULL(self);
    uint64_t taghashes[VELA_MAX_TAGS];
    Py_ssize_t ntags = vela_encode_tags(tags, taghashes);
    if (ntags < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(items, "put_many takes (key, value) pairs");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), done = 0;
    vela_keybuf *kbs = PyMem_Malloc(sizeof(vela_keybuf) * (size_t)(n ? n : 1));
    vela_valbuf *vbs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(vela_valbuf));
    PyObject *result = NULL;
    if (!kbs || !vbs) {
        PyErr_NoMemory();
        goto out;
    }
    for (; done < n; done++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, done);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "put_many takes (key, value) pairs");
            goto out;
        }
        if (vela_encode_key(PyTuple_GET_ITEM(pair, 0), &kbs[done]) < 0 ||
            vela_encode_value(PyTuple_GET_ITEM(pair, 1), self->dumps, self->dumps_codec, &vbs[done]) < 0)
            goto out;
        kbs[done].key.bytes = kbs[done].bytes;
        uint64_t size = vela_entry_block_size(kbs[done].key.len, vbs[done].len, (size_t)ntags);
        if (size == 0 || size > self->t.hdr->max_entry_size) {
            raise_vela(vela_fail(VELA_ETOOLARGE, "entry of %llu bytes for item %zd is larger than "
                                 "max_entry_size (%llu bytes)", (unsigned long long)size, done,
                                 (unsigned long long)self->t.hdr->max_entry_size));
            done++;
            goto out;
        }
    }
    int64_t expire_at = expire_at_for(&self->t, ttl_ns);
    for (Py_ssize_t i = 0; i < n; i++) {
        vela_put_args a = {.key = &kbs[i].key, .value = vbs[i].bytes, .value_len = vbs[i].len,
                           .codec = vbs[i].codec, .expire_at = expire_at, .tags = taghashes,
                           .ntags = (size_t)ntags};
        vela_err err = vela_put(&self->t, &a);
        if (err != VELA_OK) {
            raise_vela(err);
            goto out;
        }
    }
    result = Py_None;
    Py_INCREF(result);
out:
    for (Py_ssize_t i = 0; vbs && i < done && i < n; i++)
        vela_valbuf_release(&vbs[i]);
    PyMem_Free(kbs);
    PyMem_Free(vbs);
    Py_DECREF(seq);
    return result;
}

/* delete_many(keys) -> number removed */
static PyObject *Table_delete_many(TableObject *self, PyObject *keys)
{
    READY_OR_NULL(self);
    PyObject *seq = PySequence_Fast(keys, "delete_many takes an iterable of keys");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    vela_keybuf *kbs = PyMem_Malloc(sizeof(vela_keybuf) * (size_t)(n ? n : 1));
    PyObject *result = NULL;
    if (!kbs) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (vela_encode_key(PySequence_Fast_GET_ITEM(seq, i), &kbs[i]) < 0)
            goto out;
        kbs[i].key.bytes = kbs[i].bytes;
    }
    unsigned long long removed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        vela_err err = VELA_OK;
        removed += (unsigned long long)vela_delete(&self->t, &kbs[i].key, &err);
        if (err != VELA_OK) {
            raise_vela(err);
            goto out;
        }
    }
    result = PyLong_FromUnsignedLongLong(removed);
out:
    PyMem_Free(kbs);
    Py_DECREF(seq);
    return result;
}

/* reserve(key) -> token for fill() (near cache, near.c). */
static PyObject *Table_reserve(TableObject *self, PyObject *key)
{
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    uint32_t token = 0;
    vela_reserve(&self->t, &kb.key, &token);
    return PyLong_FromUnsignedLong(token);
}

/* fill(key, value, ttl_ns, tags, token) -> stored? (False: an invalidation won) */
static PyObject *Table_fill(TableObject *self, PyObject *args)
{
    PyObject *key, *value, *tags;
    long long ttl_ns;
    unsigned int token;
    if (!PyArg_ParseTuple(args, "OOLOI", &key, &value, &ttl_ns, &tags, &token))
        return NULL;
    READY_OR_NULL(self);
    uint64_t taghashes[VELA_MAX_TAGS];
    Py_ssize_t ntags = vela_encode_tags(tags, taghashes);
    if (ntags < 0)
        return NULL;
    vela_keybuf kb;
    vela_valbuf vb;
    if (vela_encode_key(key, &kb) < 0 || vela_encode_value(value, self->dumps, self->dumps_codec, &vb) < 0)
        return NULL;
    vela_put_args a = {.key = &kb.key, .value = vb.bytes, .value_len = vb.len, .codec = vb.codec,
                       .expire_at = expire_at_for(&self->t, ttl_ns), .tags = taghashes,
                       .ntags = (size_t)ntags};
    int stored = 0;
    vela_err err = vela_fill(&self->t, &a, token, &stored);
    vela_valbuf_release(&vb);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyBool_FromLong(stored);
}

/* invalidate(key) -> removed? Also voids reservations of the key's stripe. */
static PyObject *Table_invalidate(TableObject *self, PyObject *key)
{
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    int removed = 0;
    vela_err err = vela_invalidate(&self->t, &kb.key, &removed);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyBool_FromLong(removed);
}

static PyObject *Table_invalidate_all(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    vela_invalidate_all_reservations(&self->t);
    Py_RETURN_NONE;
}

static PyObject *Table_delete(TableObject *self, PyObject *key)
{
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    vela_err err = VELA_OK;
    int removed = vela_delete(&self->t, &kb.key, &err);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyBool_FromLong(removed);
}

/* flush() -> removed; flush_versioned() -> (removed, version) */
static PyObject *do_flush(TableObject *self, int with_version)
{
    READY_OR_NULL(self);
    uint64_t removed = 0, version;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    /* Entries newer than the flush's version (applied from another host
     * meanwhile) survive it here as they do everywhere else. */
    version = vela_next_version(&self->t);
    err = vela_flush(&self->t, version, &removed);
    if (err == VELA_OK)
        vela_log_append(&self->t, VELA_OP_FLUSH, NULL, 0, NULL, 0, NULL, 0, version, 0);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK)
        return raise_vela(err);
    if (with_version)
        return Py_BuildValue("(KK)", (unsigned long long)removed, (unsigned long long)version);
    return PyLong_FromUnsignedLongLong(removed);
}

static PyObject *Table_flush(TableObject *self, PyObject *Py_UNUSED(ignored)) { return do_flush(self, 0); }
static PyObject *Table_flush_versioned(TableObject *self, PyObject *Py_UNUSED(ignored)) { return do_flush(self, 1); }

static PyObject *Table_size(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    return PyLong_FromUnsignedLongLong(vela_size(&self->t));
}

/* invalidate_tag(tag) -> removed; invalidate_tag_versioned(tag) -> (removed, version, tag_id) */
static PyObject *do_invalidate_tag(TableObject *self, PyObject *tag, int with_version)
{
    READY_OR_NULL(self);
    if (!PyUnicode_Check(tag)) {
        PyErr_Format(PyExc_TypeError, "a tag must be str, not %.100s", Py_TYPE(tag)->tp_name);
        return NULL;
    }
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(tag, &len);
    if (!s)
        return NULL;
    uint64_t removed = 0, h = vela_hash_tag(s, (size_t)len), version;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    version = vela_next_version(&self->t);
    err = vela_invalidate_tag(&self->t, h, version, &removed);
    if (err == VELA_OK)
        vela_log_append(&self->t, VELA_OP_TAG, NULL, 0, NULL, 0, &h, 1, version, 0);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK)
        return raise_vela(err);
    if (with_version)
        return Py_BuildValue("(KKK)", (unsigned long long)removed, (unsigned long long)version,
                             (unsigned long long)(h & VELA_TAG_MASK));
    return PyLong_FromUnsignedLongLong(removed);
}

static PyObject *Table_invalidate_tag(TableObject *self, PyObject *tag) { return do_invalidate_tag(self, tag, 0); }
static PyObject *Table_invalidate_tag_versioned(TableObject *self, PyObject *tag)
{
    return do_invalidate_tag(self, tag, 1);
}

/* ttl(key) -> (found, remaining_ns or -1 for never) */
static PyObject *Table_ttl(TableObject *self, PyObject *key)
{
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    int64_t remaining = 0;
    int found = 0;
    vela_err err = vela_ttl(&self->t, &kb.key, &remaining, &found);
    if (err != VELA_OK)
        return raise_vela(err);
    return Py_BuildValue("(OL)", found ? Py_True : Py_False, (long long)remaining);
}

/* touch(key, ttl_ns) -> bool */
static PyObject *Table_touch(TableObject *self, PyObject *args)
{
    PyObject *key;
    long long ttl_ns;
    if (!PyArg_ParseTuple(args, "OL", &key, &ttl_ns))
        return NULL;
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    int found = 0;
    vela_err err = vela_touch(&self->t, &kb.key, expire_at_for(&self->t, ttl_ns), &found);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyBool_FromLong(found);
}

/* incr(key, delta, ttl_ns) -> int */
static PyObject *Table_incr(TableObject *self, PyObject *args)
{
    PyObject *key;
    long long delta, ttl_ns;
    if (!PyArg_ParseTuple(args, "OLL", &key, &delta, &ttl_ns))
        return NULL;
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    int64_t result = 0;
    vela_err err = vela_incr(&self->t, &kb.key, delta, expire_at_for(&self->t, ttl_ns), &result);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyLong_FromLongLong(result);
}

static PyObject *Table_expire(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    uint64_t reclaimed = 0;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_sweep(&self->t, 64, &reclaimed);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK)
        return raise_vela(err);
    return PyLong_FromUnsignedLongLong(reclaimed);
}

static PyObject *Table_sweeper_elect(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    long long stale_ns = PyLong_AsLongLong(arg);
    if (stale_ns == -1 && PyErr_Occurred())
        return NULL;
    int elected = 0;
    vela_err err = vela_sweeper_elect(&self->t, stale_ns, &elected);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyBool_FromLong(elected);
}

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
        "{s:I,s:s,s:K,s:I,s:I,s:I,s:K,s:K,s:K,s:K,s:K,s:K,s:L,s:I,s:I,s:k,s:I,s:I,s:I}",
        "format", h->format, "eviction_policy", evictions[h->eviction % 3],
        "capacity", (unsigned long long)h->capacity, "stripes", h->stripes, "buckets_per_stripe", h->buckets,
        "tag_buckets_per_stripe", h->tagbuckets, "max_size", (unsigned long long)h->max_size,
        "max_entry_size", (unsigned long long)h->max_entry_size, "heap_bytes",
        (unsigned long long)(h->heap_end - h->heap_off), "memory_used",
        (unsigned long long)__atomic_load_n(&h->heap.used_bytes, __ATOMIC_RELAXED), "entries",
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
        return raise_vela(err);
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
        return raise_vela(err);
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
        return raise_vela(err);
    Py_RETURN_NONE;
}

/* ---- the bridge's side: change log, applying remote changes, snapshots ---- */

static int parse_parts(unsigned int parts)
{
    if (parts == 0 || parts > 65536) {
        PyErr_Format(PyExc_ValueError, "partitions must be 1 to 65536, not %u", parts);
        return -1;
    }
    return 0;
}


static int raw_key(PyObject *obj, vela_keybuf *kb)
{
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) > VELA_MAX_KEY || PyBytes_GET_SIZE(obj) == 0) {
        PyErr_SetString(PyExc_ValueError, "an encoded key is 1 to 1024 bytes");
        return -1;
    }
    if (vela_key_from_bytes((const uint8_t *)PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj), kb) < 0)
        return -1;
    return 0;
}

static int64_t expire_from_remaining(vela_table *t, long long ttl_ns)
{
    return ttl_ns > 0 ? vela_now(t) + ttl_ns : 0;
}

/* Remaining ns of an expiry (0 = never, -1 = already expired). */
static long long remaining_of(int64_t expire_at, int64_t now)
{
    if (!expire_at)
        return 0;
    return expire_at > now ? (long long)(expire_at - now) : -1;
}

static PyObject *tags_tuple(const uint64_t *tags, size_t n)
{
    PyObject *tup = PyTuple_New((Py_ssize_t)n);
    for (size_t i = 0; tup && i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(tags[i] & VELA_TAG_MASK);
        if (!v) {
            Py_CLEAR(tup);
            break;
        }
        PyTuple_SET_ITEM(tup, (Py_ssize_t)i, v);
    }
    return tup;
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
    vela_header *h = self->t.hdr;
    uint64_t size = h->log_size, head = __atomic_load_n(&h->log_head, __ATOMIC_ACQUIRE);
    if (!size)
        return Py_BuildValue("([]KO)", (unsigned long long)head, Py_False);
    /* A writer may be filling up to log_size / 4 bytes past the head. */
    if (head - pos > size - size / 4 || pos > head)
        return Py_BuildValue("([]KO)", (unsigned long long)head, Py_True);
    PyObject *records = PyList_New(0);
    int64_t now = vela_now(&self->t);
    uint64_t start = pos;
    while (records && pos < head && PyList_GET_SIZE(records) < max) {
        vela_log_record r;
        memcpy(&r, self->t.log + pos % size, sizeof r);
        if (r.len < 8 || r.len % 8 || r.len > size - pos % size)
            break; /* lapped while reading: caught below */
        if (r.op != VELA_OP_PAD && (r.ntags > VELA_MAX_TAGS || r.len < sizeof r ||
                                    sizeof r + (uint64_t)r.ntags * 8 + r.key_len + r.value_len > r.len))
            break; /* the same */
        if (r.op != VELA_OP_PAD) {
            const uint8_t *p = self->t.log + pos % size + sizeof r;
            uint64_t tags[VELA_MAX_TAGS];
            size_t ntags = r.ntags <= VELA_MAX_TAGS ? r.ntags : 0;
            memcpy(tags, p, ntags * 8);
            p += (size_t)r.ntags * 8;
            PyObject *tt = tags_tuple(tags, ntags);
            PyObject *item = tt ? Py_BuildValue("(iy#y#iLNK)", r.op, p, (Py_ssize_t)r.key_len, p + r.key_len,
                                                (Py_ssize_t)r.value_len, r.codec,
                                                remaining_of(r.expire_at, now), tt,
                                                (unsigned long long)r.version) : NULL;
            if (!item || PyList_Append(records, item) < 0)
                Py_CLEAR(records);
            Py_XDECREF(item);
        }
        pos += r.len;
    }
    /* Writers may have come round while we copied: what we read is good only
     * if the ring never came within a record's reach of where we started. */
    uint64_t head2 = __atomic_load_n(&h->log_head, __ATOMIC_ACQUIRE);
    int lapped = head2 - start > size - size / 4;
    if (lapped) {
        Py_CLEAR(records);
        records = PyList_New(0);
    }
    if (!records)
        return NULL;
    return Py_BuildValue("(NKO)", records, (unsigned long long)pos, lapped ? Py_True : Py_False);
}

static PyObject *Table_log_state(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    vela_header *h = self->t.hdr;
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:I}", "head",
                         (unsigned long long)__atomic_load_n(&h->log_head, __ATOMIC_ACQUIRE), "bridge_pos",
                         (unsigned long long)h->log_bridge_pos, "dropped",
                         (unsigned long long)__atomic_load_n(&h->log_dropped, __ATOMIC_ACQUIRE), "size",
                         (unsigned long long)h->log_size, "replicated", h->replicated);
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

static Py_ssize_t parse_tag_ints(PyObject *tags, uint64_t out[VELA_MAX_TAGS])
{
    PyObject *seq = PySequence_Fast(tags, "tags must be a sequence of ints");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > VELA_MAX_TAGS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many tags");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (out[i] == (uint64_t)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return n;
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
    if (raw_key(key, &kb) < 0 || (ntags = parse_tag_ints(tags, taghashes)) < 0)
        return NULL;
    if (codec < 0 || codec >= VELA_CODEC_COUNT || version == 0 || ttl_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "bad codec, ttl or version");
        return NULL;
    }
    vela_put_args a = {.key = &kb.key, .value = (const uint8_t *)value, .value_len = (size_t)vlen,
                       .codec = (uint8_t)codec, .expire_at = expire_from_remaining(&self->t, ttl_ns),
                       .tags = taghashes, .ntags = (size_t)ntags, .version = version};
    int applied = 0;
    vela_err err = vela_apply_put(&self->t, &a, &applied);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyBool_FromLong(applied);
}

static PyObject *Table_apply_delete(TableObject *self, PyObject *args)
{
    PyObject *key;
    unsigned long long version;
    if (!PyArg_ParseTuple(args, "OK", &key, &version))
        return NULL;
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (raw_key(key, &kb) < 0)
        return NULL;
    int removed = 0;
    vela_err err = vela_apply_delete(&self->t, &kb.key, version, &removed);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyBool_FromLong(removed);
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
    if (err != VELA_OK)
        return raise_vela(err);
    return PyLong_FromUnsignedLongLong(removed);
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
    if (parts && (parse_parts(parts) < 0 || clen != (Py_ssize_t)parts)) {
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
        return raise_vela(err);
    if (self->t.stats_enabled)
        vela_count(&self->t, VELA_STAT_INVALIDATIONS, 0);
    return PyLong_FromUnsignedLongLong(removed);
}

static int scan_one(void *ctx, vela_entry *e, int64_t now)
{
    uint64_t tags[VELA_MAX_TAGS];
    for (uint32_t i = 0; i < e->ntags; i++)
        tags[i] = vela_tags_of(e)[i].tag;
    PyObject *tt = tags_tuple(tags, e->ntags);
    PyObject *item = tt ? Py_BuildValue("(y#y#iLNK)", vela_key_of(e), (Py_ssize_t)e->key_len, vela_value_of(e),
                                        (Py_ssize_t)e->value_len, e->codec, remaining_of(e->expire_at, now), tt,
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
        return PyErr_Occurred() ? NULL : raise_vela(err);
    }
    if (c == UINT64_MAX)
        return Py_BuildValue("(ON)", Py_None, items);
    return Py_BuildValue("(KN)", (unsigned long long)c, items);
}

/* ---- the partitioned topology: values as bytes, partitions --------------- */

/* get_raw(key_bytes) -> None | (value_bytes, codec, remaining_ns, tags,
 * version): the bridge's read. Nothing is decoded (a bridge never unpickles); remaining_ns 0
 * means "never expires". Counts a hit or a miss. */
static PyObject *Table_get_raw(TableObject *self, PyObject *key)
{
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (raw_key(key, &kb) < 0)
        return NULL;
    vela_table *t = &self->t;
    uint32_t s = vela_stripe_of(t, kb.key.hash);
    vela_err err = vela_stripe_lock(t, s);
    if (err != VELA_OK)
        return raise_vela(err);
    uint32_t ref = vela_find(t, s, &kb.key);
    if (!ref) {
        vela_stripe_unlock(t, s);
        VELA_COUNT(t, VELA_STAT_MISSES);
        Py_RETURN_NONE;
    }
    vela_block *b = (vela_block *)vela_at(t, ref);
    vela_entry *e = vela_entry_of(b);
    vela_mark_access(t, b);
    uint64_t tags[VELA_MAX_TAGS];
    for (uint32_t i = 0; i < e->ntags; i++)
        tags[i] = vela_tags_of(e)[i].tag;
    PyObject *tt = tags_tuple(tags, e->ntags);
    PyObject *out = tt ? Py_BuildValue("(y#iLNK)", vela_value_of(e), (Py_ssize_t)e->value_len, e->codec,
                                       remaining_of(e->expire_at, vela_now(t)), tt,
                                       (unsigned long long)e->version) : NULL;
    vela_stripe_unlock(t, s);
    if (out)
        VELA_COUNT(t, VELA_STAT_HITS);
    return out;
}

/* get_routed(key, routes, view_seq, miss, remote) -> value | miss | remote: a
 * partitioned cache's get in one call. routes[hash % len(routes)]: 0 = the
 * owner is elsewhere, 1 = this host owns the key (a miss is a miss), 2 = an L1
 * copy may be here (a miss goes to the owner). `remote` also when the cluster
 * view changed since `view_seq` (the caller re-reads it). */
static PyObject *Table_get_routed(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[1]) == 0) {
        PyErr_SetString(PyExc_TypeError, "get_routed(key, routes: bytes, view_seq, miss, remote)");
        return NULL;
    }
    READY_OR_NULL(self);
    unsigned long seq = PyLong_AsUnsignedLong(args[2]);
    if (seq == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    vela_keybuf kb;
    if (vela_encode_key(args[0], &kb) < 0)
        return NULL;
    const uint8_t *routes = (const uint8_t *)PyBytes_AS_STRING(args[1]);
    uint8_t route = routes[kb.key.hash % (uint64_t)PyBytes_GET_SIZE(args[1])];
    PyObject *out = args[4];
    if (route && __atomic_load_n(&self->t.cluster->seq, __ATOMIC_ACQUIRE) == (uint32_t)seq) {
        PyObject *value = NULL;
        int found = lookup(self, &kb.key, &value, route == 1 ? 1 : 2);
        if (found < 0)
            return NULL;
        if (found)
            return value;
        if (route == 1)
            out = args[3];
    }
    Py_INCREF(out);
    return out;
}

/* put_routed(key, value_bytes, codec, ttl_ns, tags, routes, view_seq) -> bool: a
 * partitioned cache's put made here when routes[hash % len(routes)] is 1 (this host
 * owns the key) and the view is still `view_seq` (vela_put_if_view). False: the
 * caller asks the owner's bridge. ttl_ns 0 = no expiry. */
static PyObject *Table_put_routed(TableObject *self, PyObject *args)
{
    PyObject *key, *tags;
    const char *value, *routes;
    Py_ssize_t vlen, nroutes;
    int codec;
    long long ttl_ns;
    unsigned long seq;
    if (!PyArg_ParseTuple(args, "Oy#iLOy#k", &key, &value, &vlen, &codec, &ttl_ns, &tags, &routes, &nroutes,
                          &seq))
        return NULL;
    READY_OR_NULL(self);
    if (nroutes == 0 || codec < 0 || codec >= VELA_CODEC_TOMBSTONE || ttl_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "put_routed: bad routes, codec or ttl");
        return NULL;
    }
    vela_keybuf kb;
    uint64_t taghashes[VELA_MAX_TAGS];
    Py_ssize_t ntags;
    if (vela_encode_key(key, &kb) < 0 || (ntags = parse_tag_ints(tags, taghashes)) < 0)
        return NULL;
    if (routes[kb.key.hash % (uint64_t)nroutes] != 1 || self->t.hdr->log_size == 0)
        Py_RETURN_FALSE;
    vela_put_args a = {.key = &kb.key, .value = (const uint8_t *)value, .value_len = (size_t)vlen,
                       .codec = (uint8_t)codec, .expire_at = expire_from_remaining(&self->t, ttl_ns),
                       .tags = taghashes, .ntags = (size_t)ntags};
    int done = 0;
    vela_err err = vela_put_if_view(&self->t, &a, (uint32_t)seq, &done);
    if (err != VELA_OK)
        return raise_vela(err);
    return PyBool_FromLong(done);
}

/* delete_routed(key, routes, view_seq) -> None (not here: ask the owner's bridge) |
 * removed? (vela_delete_if_view) */
static PyObject *Table_delete_routed(TableObject *self, PyObject *args)
{
    PyObject *key;
    const char *routes;
    Py_ssize_t nroutes;
    unsigned long seq;
    if (!PyArg_ParseTuple(args, "Oy#k", &key, &routes, &nroutes, &seq))
        return NULL;
    READY_OR_NULL(self);
    if (nroutes == 0) {
        PyErr_SetString(PyExc_ValueError, "delete_routed: no routes");
        return NULL;
    }
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    if (routes[kb.key.hash % (uint64_t)nroutes] != 1 || self->t.hdr->log_size == 0)
        Py_RETURN_NONE;
    int done = 0, removed = 0;
    vela_err err = vela_delete_if_view(&self->t, &kb.key, (uint32_t)seq, &done, &removed);
    if (err != VELA_OK)
        return raise_vela(err);
    if (!done)
        Py_RETURN_NONE;
    return PyBool_FromLong(removed);
}

/* encode_value(value) -> (bytes, codec): what put would store, for a remote owner. */
static PyObject *Table_encode_value(TableObject *self, PyObject *value)
{
    vela_valbuf vb;
    if (vela_encode_value(value, self->dumps, self->dumps_codec, &vb) < 0)
        return NULL;
    PyObject *out = Py_BuildValue("(y#i)", vb.bytes, (Py_ssize_t)vb.len, vb.codec);
    vela_valbuf_release(&vb);
    return out;
}

/* decode_value(bytes, codec) -> value: what get would return for those bytes. */
static PyObject *Table_decode_value(TableObject *self, PyObject *args)
{
    const char *bytes;
    Py_ssize_t len;
    int codec;
    if (!PyArg_ParseTuple(args, "y#i", &bytes, &len, &codec))
        return NULL;
    if (codec < 0 || codec >= VELA_CODEC_TOMBSTONE) {
        PyErr_Format(PyExc_ValueError, "codec %d is not a value codec", codec);
        return NULL;
    }
    PyObject *raw = vela_decode_raw((uint8_t)codec, (const uint8_t *)bytes, (size_t)len);
    return raw ? vela_decode_finish((uint8_t)codec, raw, self->loaders) : NULL;
}

typedef struct { uint32_t parts; uint64_t *counts; } partition_count_ctx;

static int count_one(void *ctx, vela_entry *e, int64_t Py_UNUSED(now))
{
    partition_count_ctx *c = ctx;
    if (e->codec != VELA_CODEC_TOMBSTONE)
        c->counts[e->hash % c->parts]++;
    return 0;
}

/* partition_counts(parts) -> [live entries of each partition (hash % parts)] */
static PyObject *Table_partition_counts(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    unsigned long parts = PyLong_AsUnsignedLong(arg);
    if ((parts == (unsigned long)-1 && PyErr_Occurred()) || parse_parts((unsigned int)parts) < 0)
        return NULL;
    partition_count_ctx c = {(uint32_t)parts, calloc(parts, sizeof(uint64_t))};
    if (!c.counts)
        return PyErr_NoMemory();
    uint64_t cursor = 0;
    vela_err err = VELA_OK;
    while (cursor != UINT64_MAX && err == VELA_OK)
        err = vela_scan(&self->t, &cursor, 1u << 16, count_one, &c);
    PyObject *out = err == VELA_OK ? PyList_New((Py_ssize_t)parts) : NULL;
    for (unsigned long i = 0; out && i < parts; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(c.counts[i]);
        if (!v)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, v);
    }
    free(c.counts);
    return err == VELA_OK ? out : raise_vela(err);
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
    if (parse_parts(parts) < 0)
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
    if (err != VELA_OK)
        return raise_vela(err);
    return PyLong_FromUnsignedLongLong(removed);
}

static PyObject *Table_next_version(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    return PyLong_FromUnsignedLongLong(vela_next_version(&self->t));
}

/* ---- partitioned topology (parts): observe(version) ----------------------------
 * The clock observes a version another host gave (a reply to a write, a heartbeat),
 * so the next write here is newer than it whatever the wall clocks say. */
static PyObject *Table_observe(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    unsigned long long version = PyLong_AsUnsignedLongLong(arg);
    if (version == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    vela_observe_version(&self->t, version);
    Py_RETURN_NONE;
}
/* ---- end partitioned topology (parts) ------------------------------------------ */

/* set_cluster(json_bytes): the bridge publishes the cluster view. */
static PyObject *Table_set_cluster(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    if (!PyBytes_Check(arg) || PyBytes_GET_SIZE(arg) > (Py_ssize_t)sizeof self->t.cluster->json) {
        PyErr_Format(PyExc_ValueError, "the cluster view is bytes of at most %zu", sizeof self->t.cluster->json);
        return NULL;
    }
    vela_cluster *c = self->t.cluster;
    __atomic_store_n(&c->seq, c->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(c->json, PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg));
    c->len = (uint32_t)PyBytes_GET_SIZE(arg);
    __atomic_store_n(&c->seq, c->seq + 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* cluster() -> bytes of the view (b"" when no bridge ever wrote one). */
static PyObject *Table_cluster(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    vela_cluster *c = self->t.cluster;
    for (int attempt = 0; attempt < 100; attempt++) {
        uint32_t seq = __atomic_load_n(&c->seq, __ATOMIC_ACQUIRE);
        if (seq & 1)
            continue;
        uint32_t len = c->len < sizeof c->json ? c->len : 0;
        PyObject *out = PyBytes_FromStringAndSize(c->json, len);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&c->seq, __ATOMIC_RELAXED) == seq)
            return out;
        Py_XDECREF(out);
    }
    return PyBytes_FromStringAndSize("", 0);
}

/* cluster_seq() -> int: changes whenever the bridge writes a new view (cheap:
 * a worker re-reads the view only when it moved). */
static PyObject *Table_cluster_seq(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    return PyLong_FromUnsignedLong(__atomic_load_n(&self->t.cluster->seq, __ATOMIC_ACQUIRE));
}

static PyObject *Table_get_node_id(TableObject *self, void *Py_UNUSED(c))
{
    if (!ready(self))
        return NULL;
    return PyLong_FromUnsignedLong(self->t.hdr->node_id);
}

static int Table_set_node_id(TableObject *self, PyObject *v, void *Py_UNUSED(c))
{
    if (!ready(self))
        return -1;
    long id = v ? PyLong_AsLong(v) : -1;
    if (id < 0 || id > 0xFFF) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "node_id is 0 to 4095");
        return -1;
    }
    self->t.hdr->node_id = (uint32_t)id;
    return 0;
}

static PyObject *Table_close(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    table_release(self);
    Py_RETURN_NONE;
}

/* debug_stall(phase, key, value): a put that stops forever at `phase` while it
 * holds its locks, so crash tests can SIGKILL it at a known point. */
static PyObject *Table_debug_stall(TableObject *self, PyObject *args)
{
    int phase;
    PyObject *key, *value;
    if (!PyArg_ParseTuple(args, "iOO", &phase, &key, &value))
        return NULL;
    READY_OR_NULL(self);
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    vela_valbuf vb;
    if (vela_encode_value(value, self->dumps, self->dumps_codec, &vb) < 0)
        return NULL;
    vela_put_args a = {.key = &kb.key, .value = vb.bytes, .value_len = vb.len, .codec = vb.codec};
    vela_debug_stall_phase = phase;
    vela_err err = vela_put(&self->t, &a);
    vela_debug_stall_phase = 0;
    vela_valbuf_release(&vb);
    if (err != VELA_OK)
        return raise_vela(err);
    Py_RETURN_NONE;
}

static PyObject *Table_get_stats_enabled(TableObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->t.stats_enabled);
}

static int Table_set_stats_enabled(TableObject *self, PyObject *v, void *Py_UNUSED(c))
{
    int on = v ? PyObject_IsTrue(v) : 0;
    if (on < 0)
        return -1;
    self->t.stats_enabled = on;
    return 0;
}

static PyObject *Table_get_lock_timeout(TableObject *self, void *Py_UNUSED(c))
{
    return PyFloat_FromDouble(self->t.lock_timeout_ns / 1e9);
}

static int Table_set_lock_timeout(TableObject *self, PyObject *v, void *Py_UNUSED(c))
{
    double secs = v ? PyFloat_AsDouble(v) : -1;
    if (secs == -1 && PyErr_Occurred())
        return -1;
    if (!(secs > 0 && secs < 86400 * 365)) {
        PyErr_SetString(PyExc_ValueError, "lock_timeout must be a positive number of seconds");
        return -1;
    }
    self->t.lock_timeout_ns = (int64_t)(secs * 1e9);
    return 0;
}

static PyObject *Table_get_clean(TableObject *self, void *Py_UNUSED(c))
{
    if (!ready(self))
        return NULL;
    return PyBool_FromLong(self->t.hdr->clean);
}

static int Table_set_clean(TableObject *self, PyObject *v, void *Py_UNUSED(c))
{
    if (!ready(self))
        return -1;
    int on = v ? PyObject_IsTrue(v) : 0;
    if (on < 0)
        return -1;
    self->t.hdr->clean = (uint32_t)on;
    return 0;
}

static PyObject *Table_get_host(TableObject *self, void *Py_UNUSED(c))
{
    if (!ready(self))
        return NULL;
    return PyUnicode_DecodeUTF8(self->t.hdr->host, (Py_ssize_t)strnlen(self->t.hdr->host, sizeof self->t.hdr->host),
                                "replace");
}

static int Table_set_host(TableObject *self, PyObject *v, void *Py_UNUSED(c))
{
    if (!ready(self))
        return -1;
    Py_ssize_t n;
    const char *s = v ? PyUnicode_AsUTF8AndSize(v, &n) : NULL;
    if (!s)
        return -1;
    memset(self->t.hdr->host, 0, sizeof self->t.hdr->host);
    memcpy(self->t.hdr->host, s, (size_t)n < sizeof self->t.hdr->host - 1 ? (size_t)n : sizeof self->t.hdr->host - 1);
    return 0;
}

static PyObject *Table_get_closed(TableObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(!self->open);
}

static PyMethodDef Table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Table_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None): the value stored under key, or default when absent or expired"},
    {"get_hit", (PyCFunction)(void (*)(void))Table_get_hit, METH_FASTCALL, "get counting hits only"},
    {"contains", (PyCFunction)Table_contains, METH_O, "contains(key) -> bool (no stats)"},
    {"put", (PyCFunction)(void (*)(void))Table_put, METH_FASTCALL, "put(key, value, ttl_ns=0, tags=None)"},
    {"delete", (PyCFunction)Table_delete, METH_O, "delete(key) -> bool"},
    {"reserve", (PyCFunction)Table_reserve, METH_O, "reserve(key) -> token (near cache)"},
    {"fill", (PyCFunction)Table_fill, METH_VARARGS, "fill(key, value, ttl_ns, tags, token) -> stored"},
    {"invalidate", (PyCFunction)Table_invalidate, METH_O, "invalidate(key) -> removed; voids fills"},
    {"invalidate_all", (PyCFunction)Table_invalidate_all, METH_NOARGS, "void every reservation"},
    {"get_many", (PyCFunction)Table_get_many, METH_O, "get_many(keys) -> {key: value}"},
    {"put_many", (PyCFunction)Table_put_many, METH_VARARGS, "put_many(pairs, ttl_ns, tags)"},
    {"delete_many", (PyCFunction)Table_delete_many, METH_O, "delete_many(keys) -> removed"},
    {"fetch_begin", (PyCFunction)Table_fetch_begin, METH_VARARGS, "fetch_begin(key, budget_ns, poll_ns)"},
    {"fetch_complete", (PyCFunction)Table_fetch_complete, METH_VARARGS, "fetch_complete(token, key, value, ttl_ns, tags)"},
    {"fetch_abort", (PyCFunction)Table_fetch_abort, METH_O, "fetch_abort(token)"},
    {"release_leases", (PyCFunction)Table_release_leases, METH_O, "release_leases(pid) -> released"},
    {"flush", (PyCFunction)Table_flush, METH_NOARGS, "flush() -> entries removed"},
    {"flush_versioned", (PyCFunction)Table_flush_versioned, METH_NOARGS, "-> (removed, version)"},
    {"invalidate_tag_versioned", (PyCFunction)Table_invalidate_tag_versioned, METH_O,
     "-> (removed, version, tag_id)"},
    {"size", (PyCFunction)Table_size, METH_NOARGS, "size() -> entries stored"},
    {"invalidate_tag", (PyCFunction)Table_invalidate_tag, METH_O, "invalidate_tag(tag) -> live entries removed"},
    {"ttl", (PyCFunction)Table_ttl, METH_O, "ttl(key) -> (found, remaining_ns or -1)"},
    {"touch", (PyCFunction)Table_touch, METH_VARARGS, "touch(key, ttl_ns) -> bool"},
    {"incr", (PyCFunction)Table_incr, METH_VARARGS, "incr(key, delta, ttl_ns) -> int"},
    {"expire", (PyCFunction)Table_expire, METH_NOARGS, "expire() -> expired entries reclaimed"},
    {"sweeper_elect", (PyCFunction)Table_sweeper_elect, METH_O, "sweeper_elect(stale_ns) -> bool"},
    {"bump", (PyCFunction)Table_bump, METH_VARARGS, "bump(counter, n=1)"},
    {"stats", (PyCFunction)Table_stats, METH_VARARGS, "stats(reset=False) -> dict of counters"},
    {"info", (PyCFunction)Table_info, METH_NOARGS, "info() -> dict of header fields"},
    {"check", (PyCFunction)Table_check, METH_NOARGS, "check() -> list of problems ([] = sound)"},
    {"stripes_info", (PyCFunction)Table_stripes_info, METH_NOARGS, "per-stripe figures, lock-free"},
    {"leases_info", (PyCFunction)Table_leases_info, METH_NOARGS, "stampede leases held, lock-free"},
    {"sample", (PyCFunction)Table_sample, METH_O, "sample(max) -> (entries, busy stripes)"},
    {"rebuild", (PyCFunction)Table_rebuild, METH_NOARGS, "rebuild() -> (kept, dropped)"},
    {"sync", (PyCFunction)Table_sync, METH_NOARGS, "sync(): msync the mapping"},
    {"log_read", (PyCFunction)Table_log_read, METH_VARARGS, "bridge: log_read(pos, max)"},
    {"log_state", (PyCFunction)Table_log_state, METH_NOARGS, "bridge: change log positions"},
    {"log_commit", (PyCFunction)Table_log_commit, METH_O, "bridge: log_commit(pos)"},
    {"apply_put", (PyCFunction)Table_apply_put, METH_VARARGS, "bridge: last-writer-wins put"},
    {"apply_delete", (PyCFunction)Table_apply_delete, METH_VARARGS, "bridge: apply_delete(key, version)"},
    {"apply_flush", (PyCFunction)Table_apply_flush, METH_O, "bridge: apply_flush(version) -> removed"},
    {"apply_tag", (PyCFunction)Table_apply_tag, METH_VARARGS, "bridge: apply_tag(tag, version) -> removed"},
    {"scan", (PyCFunction)Table_scan, METH_VARARGS, "bridge: scan(cursor, max) for snapshots"},
    {"get_routed", (PyCFunction)(void (*)(void))Table_get_routed, METH_FASTCALL,
     "get_routed(key, routes, view_seq, miss, remote)"},
    {"put_routed", (PyCFunction)Table_put_routed, METH_VARARGS,
     "put_routed(key, value_bytes, codec, ttl_ns, tags, routes, view_seq) -> made here?"},
    {"delete_routed", (PyCFunction)Table_delete_routed, METH_VARARGS,
     "delete_routed(key, routes, view_seq) -> None (not here) | removed?"},
    {"get_raw", (PyCFunction)Table_get_raw, METH_O, "bridge: get_raw(key_bytes) -> None | (bytes, codec, ttl_ns, tags, version)"},
    {"encode_value", (PyCFunction)Table_encode_value, METH_O, "encode_value(value) -> (bytes, codec)"},
    {"decode_value", (PyCFunction)Table_decode_value, METH_VARARGS, "decode_value(bytes, codec) -> value"},
    {"partition_counts", (PyCFunction)Table_partition_counts, METH_O, "partition_counts(parts) -> [entries]"},
    {"drop_partitions", (PyCFunction)Table_drop_partitions, METH_VARARGS, "drop_partitions(parts, flags) -> removed"},
    {"next_version", (PyCFunction)Table_next_version, METH_NOARGS, "a new version (HLC)"},
    {"observe", (PyCFunction)Table_observe, METH_O, "observe(version): the clock moves past it (partitioned)"},
    {"set_cluster", (PyCFunction)Table_set_cluster, METH_O, "bridge: publish the cluster view"},
    {"cluster", (PyCFunction)Table_cluster, METH_NOARGS, "the cluster view (bytes)"},
    {"cluster_seq", (PyCFunction)Table_cluster_seq, METH_NOARGS, "changes with every new view"},
    {"close", (PyCFunction)Table_close, METH_NOARGS, "close()"},
    {"debug_stall", (PyCFunction)Table_debug_stall, METH_VARARGS, "test hook: a put that stops at a phase"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Table_getset[] = {
    {"stats_enabled", (getter)Table_get_stats_enabled, (setter)Table_set_stats_enabled, "count stats", NULL},
    {"lock_timeout", (getter)Table_get_lock_timeout, (setter)Table_set_lock_timeout, "seconds", NULL},
    {"clean", (getter)Table_get_clean, (setter)Table_set_clean, "file: closed cleanly?", NULL},
    {"host", (getter)Table_get_host, (setter)Table_set_host, "file: host that has it open", NULL},
    {"node_id", (getter)Table_get_node_id, (setter)Table_set_node_id, "this host's node id", NULL},
    {"closed", (getter)Table_get_closed, NULL, "closed?", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vela._native.Table",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A shared-memory table (internal; use vela.Cache).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
    .tp_getset = Table_getset,
};

/* encode_key(key) -> bytes: the canonical encoding (the bridge routes by it). */
static PyObject *mod_encode_key(PyObject *Py_UNUSED(m), PyObject *key)
{
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)kb.bytes, (Py_ssize_t)kb.key.len);
}

static PyObject *mod_tag_hash(PyObject *Py_UNUSED(m), PyObject *tag)
{
    Py_ssize_t len;
    const char *s = PyUnicode_Check(tag) ? PyUnicode_AsUTF8AndSize(tag, &len) : NULL;
    if (!s) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "a tag is str");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(vela_hash_tag(s, (size_t)len) & VELA_TAG_MASK);
}

static PyObject *mod_decode_key(PyObject *Py_UNUSED(m), PyObject *data)
{
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "decode_key takes bytes");
        return NULL;
    }
    return vela_decode_key((const uint8_t *)PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));
}

static PyObject *mod_proc_start_time(PyObject *Py_UNUSED(m), PyObject *pid)
{
    long p = PyLong_AsLong(pid);
    if (p == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(vela_proc_start_time((uint32_t)p));
}

static PyMethodDef module_methods[] = {
    {"encode_key", mod_encode_key, METH_O, "encode_key(key) -> canonical bytes"},
    {"tag_hash", mod_tag_hash, METH_O, "tag_hash(tag) -> the id entries store for it"},
    {"decode_key", mod_decode_key, METH_O, "decode_key(bytes) -> key (inverse of encode_key)"},
    {"proc_start_time", mod_proc_start_time, METH_O, "start time of a process (clock ticks), 0 if gone"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "vela._native", "Vela's C core.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&TableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_KEY", VELA_MAX_KEY);
    PyModule_AddIntConstant(m, "MAX_TAGS", VELA_MAX_TAGS);
    PyModule_AddIntConstant(m, "ENTRY_OVERHEAD", (long)VELA_ENTRY_OVERHEAD);
    PyModule_AddIntConstant(m, "CODEC_PICKLE", VELA_CODEC_PICKLE);
    PyModule_AddIntConstant(m, "CODEC_JSON", VELA_CODEC_JSON);
    PyModule_AddIntConstant(m, "CODEC_MSGPACK", VELA_CODEC_MSGPACK);
    PyModule_AddIntConstant(m, "CODEC_CUSTOM", VELA_CODEC_CUSTOM);
    PyModule_AddIntConstant(m, "BACKEND_SHM", VELA_BACKEND_SHM);
    PyModule_AddIntConstant(m, "BACKEND_FILE", VELA_BACKEND_FILE);
    pthread_atfork(NULL, NULL, after_fork_in_child);
    return m;
}

/*
 * bind_common.c -- what every file of the binding shares: C errors become Python
 * exceptions here (the only place), the handle check, the interpreter lock
 * around waits, and conversions (keys, expiries, tags, the value reader).
 */
#include "bind.h"

PyObject *bind_errors_module;

PyObject *bind_error_class(vela_err err)
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
    if (!bind_errors_module && !(bind_errors_module = PyImport_ImportModule("vela.errors")))
        return NULL;
    const char *name = (err > 0 && err < VELA_ERR_COUNT && names[err]) ? names[err] : "VelaError";
    PyObject *cls = PyObject_GetAttrString(bind_errors_module, name);
    if (cls)
        Py_DECREF(cls); /* the module keeps it alive */
    return cls;
}

/* Raise the exception for err with this thread's message; Vela's own
 * exceptions also carry the symbol as `.code` ("VELA_EFULL"). */
PyObject *bind_raise(vela_err err)
{
    if (err == VELA_ECALLER)
        return NULL; /* a callback of ours failed: its exception stands */
    PyObject *cls = bind_error_class(err);
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
uint64_t bind_fork_generation;

void bind_after_fork(void) { bind_fork_generation++; }

int bind_ready(TableObject *self)
{
    if (!self->open) {
        PyObject *cls = bind_error_class(VELA_OK);
        if (cls) {
            PyObject *closed = PyObject_GetAttrString(bind_errors_module, "CacheClosed");
            PyErr_SetString(closed ? closed : cls, "the cache handle is closed");
            Py_XDECREF(closed);
        }
        return 0;
    }
    if (self->fork_generation != bind_fork_generation) {
        vela_stats_attach(&self->t);
        self->fork_generation = bind_fork_generation;
    }
    return 1;
}

vela_table *bind_keyed(TableObject *self, PyObject *key, vela_keybuf *kb)
{
    if (!bind_ready(self) || vela_encode_key(key, kb) < 0)
        return NULL;
    return &self->t;
}

PyObject *bind_result(vela_err err, PyObject *result)
{
    if (err == VELA_OK)
        return result;
    Py_XDECREF(result);
    return bind_raise(err);
}

int64_t bind_expire_at(vela_table *t, long long ttl_ns)
{
    return ttl_ns > 0 ? vela_now(t) + ttl_ns : 0;
}

/* Remaining ns of an expiry (0 = never, -1 = already expired). */
long long bind_remaining(int64_t expire_at, int64_t now)
{
    if (!expire_at)
        return 0;
    return expire_at > now ? (long long)(expire_at - now) : -1;
}

PyObject *bind_tags_tuple(const uint64_t *tags, size_t n)
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

int bind_raw_key(PyObject *obj, vela_keybuf *kb)
{
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) > VELA_MAX_KEY || PyBytes_GET_SIZE(obj) == 0) {
        PyErr_SetString(PyExc_ValueError, "an encoded key is 1 to 1024 bytes");
        return -1;
    }
    if (vela_key_from_bytes((const uint8_t *)PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj), kb) < 0)
        return -1;
    return 0;
}

Py_ssize_t bind_tag_ints(PyObject *tags, uint64_t out[VELA_MAX_TAGS])
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

int bind_check_parts(unsigned int parts)
{
    if (parts == 0 || parts > 65536) {
        PyErr_Format(PyExc_ValueError, "partitions must be 1 to 65536, not %u", parts);
        return -1;
    }
    return 0;
}

int bind_copy_raw(void *ctx, uint8_t codec, const uint8_t *value, uint32_t len)
{
    raw_copy *c = ctx;
    c->codec = codec;
    c->raw = vela_decode_raw(codec, value, len);
    return c->raw ? 0 : -1;
}

void bind_drop_raw(void *ctx, int copied)
{
    raw_copy *c = ctx;
    if (copied == 0)
        Py_CLEAR(c->raw);
    else
        PyErr_Clear(); /* a torn copy failed to decode: it never happened */
}

/* Find `k` and, with `value`, decode it (vela_lookup: lock-free first, else
 * under the stripe lock). 1 found, 0 absent, -1 error. count: 0 nothing,
 * 1 a hit or a miss, 2 only a hit. */
int bind_lookup(TableObject *self, const vela_key *k, PyObject **value, int count)
{
    return bind_lookup_versioned(self, k, value, count, NULL);
}

int bind_lookup_versioned(TableObject *self, const vela_key *k, PyObject **value, int count, uint64_t *version)
{
    vela_table *t = &self->t;
    raw_copy c = {NULL, 0};
    vela_reader reader = {bind_copy_raw, bind_drop_raw, &c};
    int found = 0;
    vela_err err = vela_lookup_versioned(t, k, value ? &reader : NULL, &found, version);
    if (err != VELA_OK) {
        bind_raise(err);
        return -1;
    }
    if (count == 1 || (count && found))
        VELA_COUNT(t, found ? VELA_STAT_HITS : VELA_STAT_MISSES);
    if (found && value) {
        *value = vela_decode_finish(c.codec, c.raw, self->loaders);
        return *value ? 1 : -1;
    }
    return found;
}

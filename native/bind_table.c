/*
 * bind_table.c -- the worker API of the Table type, one key at a time: get, put,
 * add/replace/cas, delete, ttl, touch, incr; flush and tag invalidation; expiry sweeps.
 */
#include "bind.h"

int bind_get_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **key, PyObject **dflt)
{
    *key = nargs > 0 ? args[0] : NULL;
    *dflt = nargs > 1 ? args[1] : Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, i));
        if (name && strcmp(name, "default") == 0 && nargs < 2)
            *dflt = args[nargs + i];
        else if (name && strcmp(name, "key") == 0 && nargs < 1)
            *key = args[nargs + i];
        else {
            PyErr_Format(PyExc_TypeError, "get() got an unexpected keyword argument '%s'", name ? name : "?");
            return -1;
        }
    }
    if (!*key || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return -1;
    }
    return 0;
}

static PyObject *get_counting(TableObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames, int count)
{
    PyObject *key, *dflt;
    if (bind_get_args(args, nargs, kwnames, &key, &dflt) < 0)
        return NULL;
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    PyObject *value = NULL;
    int found = bind_lookup(self, &kb.key, &value, count);
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
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    int found = bind_lookup(self, &kb.key, NULL, 0);
    return found < 0 ? NULL : PyBool_FromLong(found);
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
                       .expire_at = bind_expire_at(&self->t, ttl_ns), .tags = tags, .ntags = (size_t)ntags};
    vela_err err = vela_put(&self->t, &a);
    vela_valbuf_release(&vb);
    if (err != VELA_OK)
        return bind_raise(err);
    Py_RETURN_NONE;
}

/* The conditional puts: store `value` under `key` when `cond` holds (cas: `expected`,
 * encoded as a put would encode it, equals the stored bytes). -> stored? */
static PyObject *put_if(TableObject *self, PyObject *key, PyObject *value, PyObject *ttl, PyObject *tagseq,
                        vela_put_cond cond, PyObject *expected)
{
    READY_OR_NULL(self);
    long long ttl_ns = PyLong_AsLongLong(ttl);
    if (ttl_ns == -1 && PyErr_Occurred())
        return NULL;
    uint64_t tags[VELA_MAX_TAGS];
    Py_ssize_t ntags = vela_encode_tags(tagseq, tags);
    if (ntags < 0)
        return NULL;
    vela_keybuf kb;
    if (vela_encode_key(key, &kb) < 0)
        return NULL;
    vela_valbuf vb, xb = {0};
    if (vela_encode_value(value, self->dumps, self->dumps_codec, &vb) < 0)
        return NULL;
    if (expected && vela_encode_value(expected, self->dumps, self->dumps_codec, &xb) < 0) {
        vela_valbuf_release(&vb);
        return NULL;
    }
    vela_put_args a = {.key = &kb.key, .value = vb.bytes, .value_len = vb.len, .codec = vb.codec,
                       .expire_at = bind_expire_at(&self->t, ttl_ns), .tags = tags, .ntags = (size_t)ntags};
    vela_expected x = {.value = xb.bytes, .value_len = xb.len, .codec = xb.codec};
    int stored = 0;
    vela_err err = vela_put_if(&self->t, &a, cond, expected ? &x : NULL, &stored);
    vela_valbuf_release(&vb);
    if (expected)
        vela_valbuf_release(&xb);
    if (err != VELA_OK)
        return bind_raise(err);
    return PyBool_FromLong(stored);
}

/* add(key, value, ttl_ns, tags) -> stored? (only if no live entry has the key) */
static PyObject *Table_add(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "add(key, value, ttl_ns, tags)");
        return NULL;
    }
    return put_if(self, args[0], args[1], args[2], args[3], VELA_IF_ABSENT, NULL);
}

/* replace(key, value, ttl_ns, tags) -> stored? (only if a live entry has the key) */
static PyObject *Table_replace(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "replace(key, value, ttl_ns, tags)");
        return NULL;
    }
    return put_if(self, args[0], args[1], args[2], args[3], VELA_IF_PRESENT, NULL);
}

/* cas(key, expected, new, ttl_ns) -> stored? (only if the live entry's value is `expected`) */
static PyObject *Table_cas(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "cas(key, expected, new, ttl_ns)");
        return NULL;
    }
    return put_if(self, args[0], args[2], args[3], NULL, VELA_IF_EQUAL, args[1]);
}

static PyObject *Table_delete(TableObject *self, PyObject *key)
{
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    vela_err err = VELA_OK;
    int removed = vela_delete(t, &kb.key, &err);
    return bind_result(err, PyBool_FromLong(removed));
}

/* ttl(key) -> (found, remaining_ns or -1 for never) */
static PyObject *Table_ttl(TableObject *self, PyObject *key)
{
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    int64_t remaining = 0;
    int found = 0;
    vela_err err = vela_ttl(t, &kb.key, &remaining, &found);
    return bind_result(err, Py_BuildValue("(OL)", found ? Py_True : Py_False, (long long)remaining));
}

/* touch(key, ttl_ns) -> bool */
static PyObject *Table_touch(TableObject *self, PyObject *args)
{
    PyObject *key;
    long long ttl_ns;
    if (!PyArg_ParseTuple(args, "OL", &key, &ttl_ns))
        return NULL;
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    int found = 0;
    vela_err err = vela_touch(t, &kb.key, bind_expire_at(t, ttl_ns), &found);
    return bind_result(err, PyBool_FromLong(found));
}

/* incr(key, delta, ttl_ns, initial=0) -> int */
static PyObject *Table_incr(TableObject *self, PyObject *args)
{
    PyObject *key;
    long long delta, ttl_ns, initial = 0;
    if (!PyArg_ParseTuple(args, "OLL|L", &key, &delta, &ttl_ns, &initial))
        return NULL;
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    int64_t result = 0;
    vela_err err = vela_incr(t, &kb.key, delta, initial, bind_expire_at(t, ttl_ns), &result);
    return bind_result(err, PyLong_FromLongLong(result));
}

/* flush() -> removed; flush_versioned() -> (removed, version) */
static PyObject *do_flush(TableObject *self, int with_version)
{
    READY_OR_NULL(self);
    uint64_t removed = 0, version;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_flush_logged(&self->t, &removed, &version);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK)
        return bind_raise(err);
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
    err = vela_invalidate_tag_logged(&self->t, h, &removed, &version);
    Py_END_ALLOW_THREADS
    if (err != VELA_OK)
        return bind_raise(err);
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

static PyObject *Table_expire(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    uint64_t reclaimed = 0;
    vela_err err;
    Py_BEGIN_ALLOW_THREADS
    err = vela_sweep(&self->t, 64, &reclaimed);
    Py_END_ALLOW_THREADS
    return bind_result(err, PyLong_FromUnsignedLongLong(reclaimed));
}

static PyObject *Table_sweeper_elect(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    long long stale_ns = PyLong_AsLongLong(arg);
    if (stale_ns == -1 && PyErr_Occurred())
        return NULL;
    int elected = 0;
    vela_err err = vela_sweeper_elect(&self->t, stale_ns, &elected);
    return bind_result(err, PyBool_FromLong(elected));
}

PyMethodDef bind_table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Table_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None): the value stored under key, or default when absent or expired"},
    {"get_hit", (PyCFunction)(void (*)(void))Table_get_hit, METH_FASTCALL, "get counting hits only"},
    {"contains", (PyCFunction)Table_contains, METH_O, "contains(key) -> bool (no stats)"},
    {"put", (PyCFunction)(void (*)(void))Table_put, METH_FASTCALL, "put(key, value, ttl_ns=0, tags=None)"},
    {"add", (PyCFunction)(void (*)(void))Table_add, METH_FASTCALL, "add(key, value, ttl_ns, tags) -> stored?"},
    {"replace", (PyCFunction)(void (*)(void))Table_replace, METH_FASTCALL,
     "replace(key, value, ttl_ns, tags) -> stored?"},
    {"cas", (PyCFunction)(void (*)(void))Table_cas, METH_FASTCALL, "cas(key, expected, new, ttl_ns) -> stored?"},
    {"delete", (PyCFunction)Table_delete, METH_O, "delete(key) -> bool"},
    {"flush", (PyCFunction)Table_flush, METH_NOARGS, "flush() -> entries removed"},
    {"flush_versioned", (PyCFunction)Table_flush_versioned, METH_NOARGS, "-> (removed, version)"},
    {"invalidate_tag_versioned", (PyCFunction)Table_invalidate_tag_versioned, METH_O,
     "-> (removed, version, tag_id)"},
    {"size", (PyCFunction)Table_size, METH_NOARGS, "size() -> entries stored"},
    {"invalidate_tag", (PyCFunction)Table_invalidate_tag, METH_O, "invalidate_tag(tag) -> live entries removed"},
    {"ttl", (PyCFunction)Table_ttl, METH_O, "ttl(key) -> (found, remaining_ns or -1)"},
    {"touch", (PyCFunction)Table_touch, METH_VARARGS, "touch(key, ttl_ns) -> bool"},
    {"incr", (PyCFunction)Table_incr, METH_VARARGS, "incr(key, delta, ttl_ns, initial=0) -> int"},
    {"expire", (PyCFunction)Table_expire, METH_NOARGS, "expire() -> expired entries reclaimed"},
    {"sweeper_elect", (PyCFunction)Table_sweeper_elect, METH_O, "sweeper_elect(stale_ns) -> bool"},
    {NULL, NULL, 0, NULL},
};

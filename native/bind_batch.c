/*
 * bind_batch.c -- get_many, put_many, delete_many: many keys in one call.
 */
#include "bind.h"

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
        int found = bind_lookup(self, &kb.key, &value, 1);
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
            bind_raise(vela_fail(VELA_ETOOLARGE, "entry of %llu bytes for item %zd is larger than "
                                 "max_entry_size (%llu bytes)", (unsigned long long)size, done,
                                 (unsigned long long)self->t.hdr->max_entry_size));
            done++;
            goto out;
        }
    }
    int64_t expire_at = bind_expire_at(&self->t, ttl_ns);
    for (Py_ssize_t i = 0; i < n; i++) {
        vela_put_args a = {.key = &kbs[i].key, .value = vbs[i].bytes, .value_len = vbs[i].len,
                           .codec = vbs[i].codec, .expire_at = expire_at, .tags = taghashes,
                           .ntags = (size_t)ntags};
        vela_err err = vela_put(&self->t, &a);
        if (err != VELA_OK) {
            bind_raise(err);
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
            bind_raise(err);
            goto out;
        }
    }
    result = PyLong_FromUnsignedLongLong(removed);
out:
    PyMem_Free(kbs);
    Py_DECREF(seq);
    return result;
}

PyMethodDef bind_batch_methods[] = {
    {"get_many", (PyCFunction)Table_get_many, METH_O, "get_many(keys) -> {key: value}"},
    {"put_many", (PyCFunction)Table_put_many, METH_VARARGS, "put_many(pairs, ttl_ns, tags)"},
    {"delete_many", (PyCFunction)Table_delete_many, METH_O, "delete_many(keys) -> removed"},
    {NULL, NULL, 0, NULL},
};

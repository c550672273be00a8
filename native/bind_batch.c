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

/* What a key held before a batch replaced it: the batch puts it back if a later
 * item finds no room (ttl_only), so a batch that raises CacheFull changes nothing. */
typedef struct {
    int found;
    uint8_t codec;
    int64_t expire_at;
    uint8_t *value;
    size_t value_len;
    uint64_t tags[VELA_MAX_TAGS];
    size_t ntags;
} prior_entry;

static int copy_prior(void *ctx, vela_entry *e, int64_t now)
{
    (void)now;
    prior_entry *p = ctx;
    p->value = PyMem_Malloc(e->value_len ? e->value_len : 1);
    if (!p->value) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(p->value, vela_value_of(e), e->value_len);
    p->value_len = e->value_len;
    p->codec = e->codec;
    p->expire_at = e->expire_at;
    p->ntags = e->ntags;
    for (uint32_t i = 0; i < e->ntags; i++)
        p->tags[i] = vela_tags_of(e)[i].tag & VELA_TAG_MASK;
    return 0;
}

/* Put back what items [0, n) of a failed batch replaced, last first (a key twice in
 * the batch ends as it was before the first). Best effort: the error raised is the
 * batch's. */
static void undo_batch(vela_table *t, vela_keybuf *kbs, prior_entry *prior, Py_ssize_t n)
{
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        vela_err err = VELA_OK;
        if (!prior[i].found) {
            vela_delete(t, &kbs[i].key, &err);
            continue;
        }
        vela_put_args a = {.key = &kbs[i].key, .value = prior[i].value, .value_len = prior[i].value_len,
                           .codec = prior[i].codec, .expire_at = prior[i].expire_at, .tags = prior[i].tags,
                           .ntags = prior[i].ntags};
        vela_put(t, &a);
    }
}

/* put_many(items, ttl_ns, tags): items is a sequence of (key, value). Every
 * item is encoded before the first is stored, so a bad one stores nothing; on a
 * ttl_only cache, an item with no room undoes the items stored before it. */
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
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), done = 0, nprior = 0;
    prior_entry *prior = NULL;
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
    /* Only a ttl_only cache refuses a put for room (the others evict). */
    if (self->t.hdr->eviction == VELA_EVICT_TTL_ONLY &&
        !(prior = PyMem_Calloc((size_t)(n ? n : 1), sizeof(prior_entry)))) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        vela_put_args a = {.key = &kbs[i].key, .value = vbs[i].bytes, .value_len = vbs[i].len,
                           .codec = vbs[i].codec, .expire_at = expire_at, .tags = taghashes,
                           .ntags = (size_t)ntags};
        vela_err err = VELA_OK;
        if (prior) {
            err = vela_with_entry(&self->t, &kbs[i].key, copy_prior, &prior[i], &prior[i].found);
            nprior = i + 1;
        }
        if (err == VELA_OK)
            err = vela_put(&self->t, &a);
        if (err != VELA_OK) {
            if (err != VELA_ECALLER)
                bind_raise(err);
            if (prior) {
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                undo_batch(&self->t, kbs, prior, i);
                PyErr_Restore(type, value, tb);
            }
            goto out;
        }
    }
    result = Py_None;
    Py_INCREF(result);
out:
    for (Py_ssize_t i = 0; prior && i < nprior; i++)
        PyMem_Free(prior[i].value);
    PyMem_Free(prior);
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

/*
 * bind_near.c -- the near cache: reservations, fills that an invalidation
 * voids, invalidations (near.c).
 */
#include "bind.h"

/* reserve(key) -> token for fill() (near cache, near.c). */
static PyObject *Table_reserve(TableObject *self, PyObject *key)
{
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    uint32_t token = 0;
    vela_reserve(t, &kb.key, &token);
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
                       .expire_at = bind_expire_at(&self->t, ttl_ns), .tags = taghashes,
                       .ntags = (size_t)ntags};
    int stored = 0;
    vela_err err = vela_fill(&self->t, &a, token, &stored);
    vela_valbuf_release(&vb);
    return bind_result(err, PyBool_FromLong(stored));
}

/* invalidate(key) -> removed? Also voids reservations of the key's stripe. */
static PyObject *Table_invalidate(TableObject *self, PyObject *key)
{
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    int removed = 0;
    vela_err err = vela_invalidate(t, &kb.key, &removed);
    return bind_result(err, PyBool_FromLong(removed));
}

static PyObject *Table_invalidate_all(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    READY_OR_NULL(self);
    vela_invalidate_all_reservations(&self->t);
    Py_RETURN_NONE;
}

PyMethodDef bind_near_methods[] = {
    {"reserve", (PyCFunction)Table_reserve, METH_O, "reserve(key) -> token (near cache)"},
    {"fill", (PyCFunction)Table_fill, METH_VARARGS, "fill(key, value, ttl_ns, tags, token) -> stored"},
    {"invalidate", (PyCFunction)Table_invalidate, METH_O, "invalidate(key) -> removed; voids fills"},
    {"invalidate_all", (PyCFunction)Table_invalidate_all, METH_NOARGS, "void every reservation"},
    {NULL, NULL, 0, NULL},
};

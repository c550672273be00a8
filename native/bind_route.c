/*
 * bind_route.c -- partitioned routing in one call: a worker's get/put/delete of a
 * key its host owns is made here, anything else goes to the owner's bridge.
 */
#include "bind.h"

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
    if (route && vela_cluster_seq(&self->t) == (uint32_t)seq) {
        PyObject *value = NULL;
        int found = bind_lookup(self, &kb.key, &value, route == 1 ? 1 : 2);
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
    if (vela_encode_key(key, &kb) < 0 || (ntags = bind_tag_ints(tags, taghashes)) < 0)
        return NULL;
    if (routes[kb.key.hash % (uint64_t)nroutes] != 1 || self->t.hdr->log_size == 0)
        Py_RETURN_FALSE;
    vela_put_args a = {.key = &kb.key, .value = (const uint8_t *)value, .value_len = (size_t)vlen,
                       .codec = (uint8_t)codec, .expire_at = bind_expire_at(&self->t, ttl_ns),
                       .tags = taghashes, .ntags = (size_t)ntags};
    int done = 0;
    vela_err err = vela_put_if_view(&self->t, &a, (uint32_t)seq, &done);
    return bind_result(err, PyBool_FromLong(done));
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
        return bind_raise(err);
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

/* observe(version): the clock moves past a version another host gave (a bridge's
 * reply to a write), so this host's next write is newer than it whatever the wall
 * clocks say (partitioned topology). */
static PyObject *Table_observe(TableObject *self, PyObject *arg)
{
    READY_OR_NULL(self);
    unsigned long long version = PyLong_AsUnsignedLongLong(arg);
    if (version == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    vela_observe_version(&self->t, version);
    Py_RETURN_NONE;
}

PyMethodDef bind_route_methods[] = {
    {"get_routed", (PyCFunction)(void (*)(void))Table_get_routed, METH_FASTCALL,
     "get_routed(key, routes, view_seq, miss, remote)"},
    {"put_routed", (PyCFunction)Table_put_routed, METH_VARARGS,
     "put_routed(key, value_bytes, codec, ttl_ns, tags, routes, view_seq) -> made here?"},
    {"delete_routed", (PyCFunction)Table_delete_routed, METH_VARARGS,
     "delete_routed(key, routes, view_seq) -> None (not here) | removed?"},
    {"observe", (PyCFunction)Table_observe, METH_O, "observe(version): the clock moves past it"},
    {"encode_value", (PyCFunction)Table_encode_value, METH_O, "encode_value(value) -> (bytes, codec)"},
    {"decode_value", (PyCFunction)Table_decode_value, METH_VARARGS, "decode_value(bytes, codec) -> value"},
    {NULL, NULL, 0, NULL},
};

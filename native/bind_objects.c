/*
 * bind_objects.c -- local objects: a process keeps the values it decoded, each
 * with the write version of the entry it came from, and returns the same object
 * while the table's entry still has that version. A hit is then a dict lookup
 * and a lock-free read of one word (read.c: vela_version_of), no copy and no
 * unpickling, and a write from any process (or a bridge) is seen at once: it
 * gives the entry a new version.
 */
#include "bind.h"

/* keep_objects(n): keep up to n decoded values (0: none, and forget them). */
static PyObject *Table_keep_objects(TableObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "keep_objects(n): n must be >= 0");
        return NULL;
    }
    Py_CLEAR(self->objects);
    self->objects_max = n;
    if (n && !(self->objects = PyDict_New()))
        return NULL;
    Py_RETURN_NONE;
}

/* Remember value as the decoding of `version`, making room by forgetting the
 * value kept longest (dict order is insertion order). */
static int keep(TableObject *self, PyObject *key, uint64_t version, PyObject *value)
{
    if (PyDict_GET_SIZE(self->objects) >= self->objects_max && !PyDict_Contains(self->objects, key)) {
        Py_ssize_t pos = 0;
        PyObject *oldest, *held;
        if (PyDict_Next(self->objects, &pos, &oldest, &held)) {
            Py_INCREF(oldest);
            int err = PyDict_DelItem(self->objects, oldest);
            Py_DECREF(oldest);
            if (err < 0)
                return -1;
        }
    }
    PyObject *entry = Py_BuildValue("(KO)", (unsigned long long)version, value);
    if (!entry)
        return -1;
    int err = PyDict_SetItem(self->objects, key, entry);
    Py_DECREF(entry);
    return err;
}

/* The version a kept value was decoded from, 0 when none is kept for key. */
static uint64_t kept_version(TableObject *self, PyObject *key, PyObject **value)
{
    PyObject *held = PyDict_GetItemWithError(self->objects, key); /* borrowed */
    if (!held)
        return 0; /* (an unhashable key: vela_encode_key has refused it already) */
    *value = PyTuple_GET_ITEM(held, 1);
    return PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(held, 0));
}

/* get(key, default=None) through the kept values (Cache.get with local_objects). */
static PyObject *Table_get_object(TableObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *dflt;
    if (bind_get_args(args, nargs, kwnames, &key, &dflt) < 0)
        return NULL;
    if (!self->objects) {
        PyErr_SetString(PyExc_RuntimeError, "get_object() needs keep_objects(n) first");
        return NULL;
    }
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    uint64_t version = 0;
    vela_err err = vela_version_of(t, &kb.key, &version);
    if (err != VELA_OK)
        return bind_raise(err);
    if (!version && PyDict_GET_SIZE(self->objects) && PyDict_DelItem(self->objects, key) < 0)
        PyErr_Clear(); /* (none was kept) */
    PyObject *value = NULL;
    uint64_t kept = version ? kept_version(self, key, &value) : 0;
    if (PyErr_Occurred())
        return NULL;
    if (kept && kept == version) {
        VELA_COUNT(t, VELA_STAT_HITS);
        Py_INCREF(value);
        return value;
    }
    /* Decode it, and keep it only if no write came between the two version reads:
     * versions only grow, so an unchanged one means these bytes are that version's. */
    value = NULL;
    int found = bind_lookup(self, &kb.key, &value, 1);
    if (found < 0)
        return NULL;
    if (!found) {
        Py_INCREF(dflt);
        return dflt;
    }
    uint64_t after = 0;
    if (version && vela_version_of(t, &kb.key, &after) == VELA_OK && after == version &&
        keep(self, key, version, value) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    return value;
}

PyMethodDef bind_objects_methods[] = {
    {"keep_objects", (PyCFunction)Table_keep_objects, METH_O, "keep_objects(n): keep up to n decoded values"},
    {"get_object", (PyCFunction)(void (*)(void))Table_get_object, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None) through the decoded values this process keeps"},
    {NULL, NULL, 0, NULL},
};

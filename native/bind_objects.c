/*
 * bind_objects.c -- local objects: a process keeps the values it decoded, each
 * with the write version of the entry it came from, and returns the same object
 * while the table's entry still has that version. A hit is then a dict lookup
 * and a lock-free read of one word (read.c: vela_version_of), no copy and no
 * unpickling, and a write from any process (or a bridge) is seen at once: it
 * gives the entry a new version (versions are unique in the table: a clock, an
 * order and the node id).
 *
 * Every read of such a handle goes through object_of: get, get_many, and the
 * first, lock-free look of get_or_fetch. Stamped values (vela.stamp: what
 * get_or_fetch with stale_ttl, early or stale_if_error stores) are kept as their
 * Stamped, decoded as within reading_stamps, and handed out through
 * vela.stamp.as_read: get_or_fetch sees the stamp and judges its freshness on
 * every hit, a get sees the bare value, and both share the one decoding.
 */
#include "bind.h"

#define STAMPED_TYPE(self) ((PyTypeObject *)PyTuple_GET_ITEM((self)->objects_stamp, 0))
#define AS_READ(self) PyTuple_GET_ITEM((self)->objects_stamp, 1)
#define READING(self) PyTuple_GET_ITEM((self)->objects_stamp, 2)

/* keep_objects(n, stamp): keep up to n decoded values (0: none, and forget them);
 * stamp is (vela.stamp.Stamped, vela.stamp.as_read, vela.stamp.READING). */
static PyObject *Table_keep_objects(TableObject *self, PyObject *args)
{
    Py_ssize_t n;
    PyObject *stamp;
    if (!PyArg_ParseTuple(args, "nO!:keep_objects", &n, &PyTuple_Type, &stamp))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "keep_objects(n, stamp): n must be >= 0");
        return NULL;
    }
    if (PyTuple_GET_SIZE(stamp) != 3 || !PyType_Check(PyTuple_GET_ITEM(stamp, 0)) ||
        !PyCallable_Check(PyTuple_GET_ITEM(stamp, 1)) || !PyContextVar_CheckExact(PyTuple_GET_ITEM(stamp, 2))) {
        PyErr_SetString(PyExc_TypeError, "keep_objects(n, stamp): stamp is (Stamped, as_read, READING) "
                        "of vela.stamp");
        return NULL;
    }
    Py_CLEAR(self->objects);
    Py_INCREF(stamp);
    Py_XSETREF(self->objects_stamp, stamp);
    self->objects_max = n;
    if (n && !(self->objects = PyODict_New()))
        return NULL;
    Py_RETURN_NONE;
}

/* Remember value as the decoding of `version`, making room by forgetting the
 * value kept longest. The objects are an OrderedDict: its first key is found in
 * O(1), where a dict's first live entry lies past the holes that removing the
 * oldest leaves (a scan that grew with the number kept). */
static int keep(TableObject *self, PyObject *key, uint64_t version, PyObject *value)
{
    if (!self->objects)
        return 0; /* closed meanwhile (by another thread, while the value decoded) */
    if (PyDict_GET_SIZE(self->objects) >= self->objects_max && !PyDict_Contains(self->objects, key)) {
        PyObject *order = PyObject_GetIter(self->objects);
        if (!order)
            return -1;
        PyObject *oldest = PyIter_Next(order);
        Py_DECREF(order);
        if (!oldest && PyErr_Occurred())
            return -1;
        if (oldest) {
            int err = PyODict_DelItem(self->objects, oldest);
            Py_DECREF(oldest);
            if (err < 0)
                return -1;
        }
    }
    PyObject *entry = Py_BuildValue("(KO)", (unsigned long long)version, value);
    if (!entry)
        return -1;
    int err = PyODict_SetItem(self->objects, key, entry);
    Py_DECREF(entry);
    return err;
}

/* What a read hands its caller for a decoded value (a new reference): a Stamped
 * as vela.stamp.as_read says, anything else itself. */
static PyObject *as_read(TableObject *self, PyObject *value)
{
    if (Py_TYPE(value) != STAMPED_TYPE(self)) {
        Py_INCREF(value);
        return value;
    }
    return PyObject_CallOneArg(AS_READ(self), value);
}

/* bind_lookup_versioned with vela.stamp.READING set, so that a stamped value
 * decodes as its Stamped (what is kept then serves every kind of read). */
static int decode_stamped(TableObject *self, const vela_key *k, PyObject **value, int count, uint64_t *version)
{
    PyObject *token = PyContextVar_Set(READING(self), Py_True);
    if (!token)
        return -1;
    int found = bind_lookup_versioned(self, k, value, count, version);
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb); /* (the lookup's error, if any, outlives the reset) */
    int reset = PyContextVar_Reset(READING(self), token);
    Py_DECREF(token);
    if (reset < 0) {
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        if (found > 0)
            Py_CLEAR(*value);
        return -1;
    }
    PyErr_Restore(type, exc, tb);
    return found;
}

/* Find k (`key` encoded) through the kept values: 1 with *value (a new
 * reference), 0 absent, -1 error; count as bind_lookup. A hit whose kept value
 * has the entry's version costs a version read and a dict lookup; otherwise the
 * value is decoded and kept with the version of the bytes it was decoded from
 * (read with them: a write in between makes the next read decode again). */
static int object_of(TableObject *self, PyObject *key, const vela_key *k, PyObject **value, int count)
{
    vela_table *t = &self->t;
    uint64_t version = 0;
    vela_err err = vela_version_of(t, k, &version);
    if (err != VELA_OK) {
        bind_raise(err);
        return -1;
    }
    PyObject *held = PyDict_GetItemWithError(self->objects, key); /* borrowed (version, value) */
    if (!held && PyErr_Occurred())
        return -1;
    if (!version) {
        if (count == 1)
            VELA_COUNT(t, VELA_STAT_MISSES);
        return held && PyODict_DelItem(self->objects, key) < 0 ? -1 : 0;
    }
    if (held) {
        uint64_t kept = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(held, 0));
        if (kept == version) {
            if (count)
                VELA_COUNT(t, VELA_STAT_HITS);
            PyObject *object = PyTuple_GET_ITEM(held, 1);
            Py_INCREF(object); /* (as_read may run Python code, which may replace the entry) */
            *value = as_read(self, object);
            Py_DECREF(object);
            return *value ? 1 : -1;
        }
    }
    PyObject *decoded = NULL;
    uint64_t decoded_version = 0;
    int found = decode_stamped(self, k, &decoded, count, &decoded_version);
    if (found <= 0)
        return found;
    if (keep(self, key, decoded_version, decoded) < 0) {
        Py_DECREF(decoded);
        return -1;
    }
    *value = as_read(self, decoded);
    Py_DECREF(decoded);
    return *value ? 1 : -1;
}

/* 1 when the handle is open and keeps objects, else 0 with the exception set
 * (CacheClosed first: closing forgets the objects). */
static int objects_ready(TableObject *self)
{
    if (!bind_ready(self))
        return 0;
    if (!self->objects) {
        PyErr_SetString(PyExc_RuntimeError, "reading through kept objects needs keep_objects(n, stamp) first");
        return 0;
    }
    return 1;
}

static PyObject *get_object_counting(TableObject *self, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames, int count)
{
    PyObject *key, *dflt;
    if (bind_get_args(args, nargs, kwnames, &key, &dflt) < 0)
        return NULL;
    vela_keybuf kb;
    if (!objects_ready(self) || vela_encode_key(key, &kb) < 0)
        return NULL;
    PyObject *value = NULL;
    int found = object_of(self, key, &kb.key, &value, count);
    if (found < 0)
        return NULL;
    if (found)
        return value;
    Py_INCREF(dflt);
    return dflt;
}

/* get(key, default=None) through the kept values (Cache.get with local_objects). */
static PyObject *Table_get_object(TableObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return get_object_counting(self, args, nargs, kwnames, 1);
}

/* get_object_hit(key, default): get_object counting a hit but not a miss (the
 * lock-free first look of get_or_fetch, as get_hit). */
static PyObject *Table_get_object_hit(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return get_object_counting(self, args, nargs, NULL, 2);
}

/* get_objects(keys) -> {key: value} for the keys present: get_many through the kept values. */
static PyObject *Table_get_objects(TableObject *self, PyObject *keys)
{
    if (!objects_ready(self))
        return NULL;
    PyObject *seq = PySequence_Fast(keys, "get_many takes an iterable of keys");
    if (!seq)
        return NULL;
    PyObject *out = PyDict_New();
    for (Py_ssize_t i = 0; out && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(seq, i);
        vela_keybuf kb;
        PyObject *value = NULL;
        /* (ready again: a loader may have run Python code that closed the handle) */
        int found = !objects_ready(self) || vela_encode_key(key, &kb) < 0 ? -1
                    : object_of(self, key, &kb.key, &value, 1);
        if (found < 0 || (found && PyDict_SetItem(out, key, value) < 0))
            Py_CLEAR(out);
        Py_XDECREF(value);
    }
    Py_DECREF(seq);
    return out;
}

PyMethodDef bind_objects_methods[] = {
    {"keep_objects", (PyCFunction)Table_keep_objects, METH_VARARGS,
     "keep_objects(n, stamp): keep up to n decoded values"},
    {"get_object", (PyCFunction)(void (*)(void))Table_get_object, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None) through the decoded values this process keeps"},
    {"get_object_hit", (PyCFunction)(void (*)(void))Table_get_object_hit, METH_FASTCALL,
     "get_object counting hits only"},
    {"get_objects", (PyCFunction)Table_get_objects, METH_O,
     "get_many(keys) -> {key: value} through the decoded values this process keeps"},
    {NULL, NULL, 0, NULL},
};

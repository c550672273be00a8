/*
 * module.c -- the vela._native module: the Table type (its life: open,
 * close, attributes) with the methods of every bind_*.c file put together,
 * the module's functions and constants.
 */
#include <stddef.h>
#include "bind.h"

#include <pthread.h>
#include <unistd.h>

static void table_release(TableObject *self)
{
    if (self->open) {
        vela_close(&self->t);
        self->open = 0;
    }
    Py_CLEAR(self->objects);
    Py_CLEAR(self->objects_stamp);
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
    int fd, backend, dumps_codec, lock_fd = -2, reinit = 1, topology = -1;
    vela_options o;
    PyObject *dumps, *loaders;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiLLLLLOiO|ipi", kwlist, &fd, &backend, &o.capacity,
                                     &o.stripes, &o.max_size, &o.max_entry_size, &o.eviction, &dumps,
                                     &dumps_codec, &loaders, &lock_fd, &reinit, &topology))
        return -1;
    o.topology = topology;
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
        bind_raise(err);
        return -1;
    }
    self->open = 1;
    self->fork_generation = bind_fork_generation;
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

static PyObject *Table_close(TableObject *self, PyObject *Py_UNUSED(ignored))
{
    table_release(self);
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
    if (!bind_ready(self))
        return NULL;
    return PyBool_FromLong(self->t.hdr->clean);
}

static int Table_set_clean(TableObject *self, PyObject *v, void *Py_UNUSED(c))
{
    if (!bind_ready(self))
        return -1;
    int on = v ? PyObject_IsTrue(v) : 0;
    if (on < 0)
        return -1;
    self->t.hdr->clean = (uint32_t)on;
    return 0;
}

static PyObject *Table_get_host(TableObject *self, void *Py_UNUSED(c))
{
    if (!bind_ready(self))
        return NULL;
    return PyUnicode_DecodeUTF8(self->t.hdr->host, (Py_ssize_t)strnlen(self->t.hdr->host, sizeof self->t.hdr->host),
                                "replace");
}

static int Table_set_host(TableObject *self, PyObject *v, void *Py_UNUSED(c))
{
    if (!bind_ready(self))
        return -1;
    Py_ssize_t n;
    const char *s = v ? PyUnicode_AsUTF8AndSize(v, &n) : NULL;
    if (!s)
        return -1;
    memset(self->t.hdr->host, 0, sizeof self->t.hdr->host);
    memcpy(self->t.hdr->host, s, (size_t)n < sizeof self->t.hdr->host - 1 ? (size_t)n : sizeof self->t.hdr->host - 1);
    return 0;
}

static PyObject *Table_get_node_id(TableObject *self, void *Py_UNUSED(c))
{
    if (!bind_ready(self))
        return NULL;
    return PyLong_FromUnsignedLong(self->t.hdr->node_id);
}

static int Table_set_node_id(TableObject *self, PyObject *v, void *Py_UNUSED(c))
{
    if (!bind_ready(self))
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

static PyObject *Table_get_closed(TableObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(!self->open);
}

static PyGetSetDef Table_getset[] = {
    {"stats_enabled", (getter)Table_get_stats_enabled, (setter)Table_set_stats_enabled, "count stats", NULL},
    {"lock_timeout", (getter)Table_get_lock_timeout, (setter)Table_set_lock_timeout, "seconds", NULL},
    {"clean", (getter)Table_get_clean, (setter)Table_set_clean, "file: closed cleanly?", NULL},
    {"host", (getter)Table_get_host, (setter)Table_set_host, "file: host that has it open", NULL},
    {"node_id", (getter)Table_get_node_id, (setter)Table_set_node_id, "this host's node id", NULL},
    {"closed", (getter)Table_get_closed, NULL, "closed?", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef handle_methods[] = {
    {"close", (PyCFunction)Table_close, METH_NOARGS, "close()"},
    {NULL, NULL, 0, NULL},
};

/* Every file's methods, in one table for the type (filled by PyInit). The
 * bridge's methods are also on BridgeTable, the bridge's own type: they stay on
 * Table only until the bridge opens its table as a BridgeTable. */
static PyMethodDef *const method_tables[] = {
    handle_methods, bind_table_methods, bind_batch_methods, bind_near_methods, bind_objects_methods,
    bind_lease_methods,
    bind_inspect_methods, bind_bridge_methods, bind_route_methods, bind_testhook_methods,
};
#define MAX_METHODS 96
static PyMethodDef Table_methods[MAX_METHODS];

static int compose_methods(void)
{
    size_t n = 0;
    for (size_t i = 0; i < sizeof method_tables / sizeof *method_tables; i++)
        for (PyMethodDef *m = method_tables[i]; m->ml_name; m++) {
            if (n + 1 >= MAX_METHODS) {
                PyErr_SetString(PyExc_SystemError, "vela._native: raise MAX_METHODS");
                return -1;
            }
            Table_methods[n++] = *m;
        }
    return 0;
}

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

/* The bridge's table: a Table (same constructor) with the change log reader,
 * apply_*, snapshots and partition moves, which workers have no use for. */
static PyTypeObject BridgeTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vela._native.BridgeTable",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The table as the vela-bridge opens it (internal).",
    .tp_base = &TableType,
    .tp_methods = bind_bridge_methods,
};

int bind_is_table(PyObject *o)
{
    return PyObject_TypeCheck(o, &TableType);
}

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

/* entry_size(key_len, value_len, ntags) -> bytes of the entry's block (0: too large);
 * what max_entry_size bounds, for a check made before anything is sent. */
static PyObject *mod_entry_size(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_ssize_t key_len, value_len, ntags;
    if (!PyArg_ParseTuple(args, "nnn", &key_len, &value_len, &ntags))
        return NULL;
    if (key_len < 0 || value_len < 0 || ntags < 0 || ntags > VELA_MAX_TAGS) {
        PyErr_SetString(PyExc_ValueError, "entry_size: bad lengths");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(vela_entry_block_size((size_t)key_len, (size_t)value_len, (size_t)ntags));
}

static PyMethodDef module_methods[] = {
    {"encode_key", mod_encode_key, METH_O, "encode_key(key) -> canonical bytes"},
    {"tag_hash", mod_tag_hash, METH_O, "tag_hash(tag) -> the id entries store for it"},
    {"entry_size", mod_entry_size, METH_VARARGS, "entry_size(key_len, value_len, ntags) -> block bytes"},
    {"decode_key", mod_decode_key, METH_O, "decode_key(bytes) -> key (inverse of encode_key)"},
    {"proc_start_time", mod_proc_start_time, METH_O, "start time of a process (clock ticks), 0 if gone"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "vela._native", "Vela's C core.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

/* The C core's numbers Python needs, from the one place they are defined
 * (table.h, vela.h): Python code uses these names, never the bare ints. */
#define C(prefix, name) {#name, prefix##name}
static const struct { const char *name; unsigned long long value; } constants[] = {
    {"MAGIC", VELA_MAGIC}, {"READY", VELA_READY}, {"MAX_KEY", VELA_MAX_KEY}, {"MAX_TAGS", VELA_MAX_TAGS}, {"ENTRY_OVERHEAD", (long)VELA_ENTRY_OVERHEAD},
    {"FORMAT", VELA_FORMAT}, {"HEADER_TOPOLOGY_OFFSET", offsetof(vela_header, topology)},
    {"CLUSTER_BYTES", sizeof(((vela_cluster *)0)->json)},
    C(VELA_, CODEC_BYTES), C(VELA_, CODEC_STR), C(VELA_, CODEC_INT), C(VELA_, CODEC_PICKLE),
    C(VELA_, CODEC_JSON), C(VELA_, CODEC_MSGPACK), C(VELA_, CODEC_CUSTOM), C(VELA_, CODEC_TOMBSTONE),
    C(VELA_, BACKEND_SHM), C(VELA_, BACKEND_FILE),
    C(VELA_, EVICT_LRU), C(VELA_, EVICT_LFU), C(VELA_, EVICT_TTL_ONLY),
    C(VELA_, TOPOLOGY_LOCAL), C(VELA_, TOPOLOGY_REPLICATED), C(VELA_, TOPOLOGY_PARTITIONED),
    C(VELA_, OP_PUT), C(VELA_, OP_DELETE), C(VELA_, OP_FLUSH), C(VELA_, OP_TAG),
    C(VELA_, FETCH_HIT), C(VELA_, FETCH_MINE), C(VELA_, FETCH_TIMEOUT), C(VELA_, FETCH_ALONE),
    C(VELA_, FETCH_BUSY), {"PUT_IF_ABSENT", VELA_IF_ABSENT}, {"PUT_IF_PRESENT", VELA_IF_PRESENT},
    {"PUT_IF_EQUAL", VELA_IF_EQUAL},
};
#undef C

PyMODINIT_FUNC PyInit__native(void)
{
    if (compose_methods() < 0 || PyType_Ready(&TableType) < 0 || PyType_Ready(&BridgeTableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Table", (PyObject *)&TableType) < 0 ||
        PyModule_AddObjectRef(m, "BridgeTable", (PyObject *)&BridgeTableType) < 0 || bind_dataserver_add(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof constants / sizeof *constants; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(constants[i].value);
        int rc = v ? PyModule_AddObjectRef(m, constants[i].name, v) : -1;
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    pthread_atfork(NULL, NULL, bind_after_fork);
    return m;
}

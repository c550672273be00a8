/*
 * bind_dataserver.c -- DataServer, the native data port thread (dataserver.h)
 * as vela/bridge/dataport.py drives it.
 */
#include "bind.h"
#include "dataserver.h"
#include "sha256.h"

typedef struct {
    PyObject_HEAD
    vela_dataserver *ds;
    PyObject *tables; /* name -> the table a cache is read from (kept alive while served) */
} DataServerObject;

static int DataServer_init(DataServerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"listen_fd", "secret", "max_connections", "max_request", "protocol", NULL};
    int fd;
    Py_buffer secret;
    unsigned int max_conns, max_request, version;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*III", kwlist, &fd, &secret, &max_conns, &max_request,
                                     &version))
        return -1;
    if (self->ds) {
        PyBuffer_Release(&secret);
        PyErr_SetString(PyExc_RuntimeError, "DataServer: already initialised");
        return -1;
    }
    self->ds = vela_ds_new(fd, secret.buf, (size_t)secret.len, max_conns, max_request, version);
    PyBuffer_Release(&secret);
    if (!self->ds || !(self->tables = PyDict_New())) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (vela_ds_start(self->ds) < 0) {
        vela_ds_free(self->ds);
        self->ds = NULL;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void stop(DataServerObject *self)
{
    if (self->ds) {
        vela_dataserver *ds = self->ds;
        self->ds = NULL;
        Py_BEGIN_ALLOW_THREADS
        vela_ds_free(ds);
        Py_END_ALLOW_THREADS
    }
    Py_CLEAR(self->tables);
}

static void DataServer_dealloc(DataServerObject *self)
{
    stop(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define RUNNING_OR_NULL(self) do { if (!(self)->ds) { \
    PyErr_SetString(PyExc_ValueError, "the data server is closed"); return NULL; } } while (0)

static PyObject *DataServer_close(DataServerObject *self, PyObject *Py_UNUSED(ignored))
{
    stop(self);
    Py_RETURN_NONE;
}

static PyObject *DataServer_fileno(DataServerObject *self, PyObject *Py_UNUSED(ignored))
{
    RUNNING_OR_NULL(self);
    return PyLong_FromLong(vela_ds_notify_fd(self->ds));
}

/* take() -> [(conn, context, mac, payload)]: the requests for the Python loop, and
 * (conn, None, None, None) for each connection closed since. */
static PyObject *DataServer_take(DataServerObject *self, PyObject *Py_UNUSED(ignored))
{
    RUNNING_OR_NULL(self);
    vela_ds_item *items = vela_ds_take(self->ds);
    PyObject *out = PyList_New(0);
    for (vela_ds_item *item = items, *next; item; item = next) {
        next = item->next;
        PyObject *t = NULL;
        if (out && item->kind == VELA_DS_CLOSED)
            t = Py_BuildValue("(KOOO)", (unsigned long long)item->conn, Py_None, Py_None, Py_None);
        else if (out)
            t = Py_BuildValue("(Ky#y#y#)", (unsigned long long)item->conn, (const char *)item->context,
                              (Py_ssize_t)VELA_DS_CONTEXT, (const char *)item->data, (Py_ssize_t)item->mac_len,
                              (const char *)item->data + item->mac_len, (Py_ssize_t)item->payload_len);
        if (!t || PyList_Append(out, t) < 0)
            Py_CLEAR(out);
        Py_XDECREF(t);
        free(item);
    }
    return out;
}

/* send(conn, data) -> bool: queued (False: that connection is gone). */
static PyObject *DataServer_send(DataServerObject *self, PyObject *args)
{
    unsigned long long conn;
    Py_buffer data;
    RUNNING_OR_NULL(self);
    if (!PyArg_ParseTuple(args, "Ky*", &conn, &data))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vela_ds_send(self->ds, conn, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyBool_FromLong(rc == 0);
}

/* serve_for(seconds, epoch): gets are answered natively until then, their replies
 * carrying the partition table's epoch (dataserver.h). */
static PyObject *DataServer_serve_for(DataServerObject *self, PyObject *args)
{
    double seconds;
    unsigned long long epoch;
    RUNNING_OR_NULL(self);
    if (!PyArg_ParseTuple(args, "dK", &seconds, &epoch))
        return NULL;
    vela_ds_serve_for(self->ds, seconds > 0 ? (uint64_t)(seconds * 1e9) : 0, epoch);
    Py_RETURN_NONE;
}

static PyObject *DataServer_set_identity(DataServerObject *self, PyObject *args)
{
    unsigned int node_id;
    unsigned long long inc;
    RUNNING_OR_NULL(self);
    if (!PyArg_ParseTuple(args, "IK", &node_id, &inc))
        return NULL;
    vela_ds_set_identity(self->ds, node_id, inc);
    Py_RETURN_NONE;
}

/* set_cache(name, table, parts, servable): servable is a flag per partition (bytes of
 * length parts) or None. */
static PyObject *DataServer_set_cache(DataServerObject *self, PyObject *args)
{
    const char *name;
    PyObject *table, *servable;
    unsigned int parts;
    RUNNING_OR_NULL(self);
    if (!PyArg_ParseTuple(args, "sOIO", &name, &table, &parts, &servable))
        return NULL;
    if (!bind_is_table(table)) {
        PyErr_SetString(PyExc_TypeError, "set_cache: table must be a vela._native.Table");
        return NULL;
    }
    if (!bind_ready((TableObject *)table))
        return NULL;
    if (bind_check_parts(parts) < 0)
        return NULL;
    if (servable != Py_None && (!PyBytes_Check(servable) || PyBytes_GET_SIZE(servable) != (Py_ssize_t)parts)) {
        PyErr_SetString(PyExc_ValueError, "servable: bytes of one flag per partition, or None");
        return NULL;
    }
    if (PyDict_SetItemString(self->tables, name, table) < 0)
        return NULL;
    const uint8_t *flags = servable == Py_None ? NULL : (const uint8_t *)PyBytes_AS_STRING(servable);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vela_ds_set_cache(self->ds, name, &((TableObject *)table)->t, parts, flags);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* counters() -> {"malformed", "unauthenticated", "served", "bytes_in"}: since start. */
static PyObject *DataServer_counters(DataServerObject *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t c[VELA_DS_COUNTERS];
    RUNNING_OR_NULL(self);
    vela_ds_counters(self->ds, c);
    return Py_BuildValue("{s:K,s:K,s:K,s:K}", "malformed", (unsigned long long)c[VELA_DS_MALFORMED],
                         "unauthenticated", (unsigned long long)c[VELA_DS_UNAUTHENTICATED], "served",
                         (unsigned long long)c[VELA_DS_SERVED], "bytes_in", (unsigned long long)c[VELA_DS_BYTES_IN]);
}

static PyObject *DataServer_served(DataServerObject *self, PyObject *name)
{
    RUNNING_OR_NULL(self);
    const char *s = PyUnicode_AsUTF8(name);
    if (!s)
        return NULL;
    return PyLong_FromUnsignedLongLong(vela_ds_served(self->ds, s));
}

/* hmac(secret, a, b) -> the HMAC-SHA256 of a || b the data port computes (the tests
 * hold it to Python's hmac). */
static PyObject *DataServer_hmac(PyObject *Py_UNUSED(cls), PyObject *args)
{
    Py_buffer secret, a, b;
    if (!PyArg_ParseTuple(args, "y*y*y*", &secret, &a, &b))
        return NULL;
    vela_hmac_key key;
    uint8_t out[VELA_SHA256_BYTES];
    vela_hmac_key_init(&key, secret.buf, (size_t)secret.len);
    vela_hmac2(&key, a.buf, (size_t)a.len, b.buf, (size_t)b.len, out);
    PyBuffer_Release(&secret);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)out, sizeof out);
}

static PyMethodDef DataServer_methods[] = {
    {"hmac", (PyCFunction)DataServer_hmac, METH_VARARGS | METH_STATIC, "hmac(secret, a, b) -> HMAC-SHA256 of a || b"},
    {"close", (PyCFunction)DataServer_close, METH_NOARGS, "stop the thread, close every connection"},
    {"fileno", (PyCFunction)DataServer_fileno, METH_NOARGS, "readable when take() has something"},
    {"take", (PyCFunction)DataServer_take, METH_NOARGS, "take() -> [(conn, context, mac, payload)]"},
    {"send", (PyCFunction)DataServer_send, METH_VARARGS, "send(conn, data) -> bool"},
    {"serve_for", (PyCFunction)DataServer_serve_for, METH_VARARGS,
     "serve_for(seconds, epoch): answer gets natively until then"},
    {"set_identity", (PyCFunction)DataServer_set_identity, METH_VARARGS, "set_identity(node_id, incarnation)"},
    {"set_cache", (PyCFunction)DataServer_set_cache, METH_VARARGS,
     "set_cache(name, table, parts, servable)"},
    {"counters", (PyCFunction)DataServer_counters, METH_NOARGS, "the thread's counters"},
    {"served", (PyCFunction)DataServer_served, METH_O, "served(name) -> gets of that cache answered natively"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DataServerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vela._native.DataServer",
    .tp_basicsize = sizeof(DataServerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DataServer(listen_fd, secret, max_connections, max_request, protocol): the bridge's data port on a "
              "native thread (internal; vela/bridge/dataport.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)DataServer_init,
    .tp_dealloc = (destructor)DataServer_dealloc,
    .tp_methods = DataServer_methods,
};

int bind_dataserver_add(PyObject *module)
{
    if (PyType_Ready(&DataServerType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "DataServer", (PyObject *)&DataServerType);
}

/*
 * bind_lease.c -- stampede protection: fetch_begin / fetch_complete / fetch_abort
 * around a fetch, and the release of a dead worker's leases (lease.c).
 */
#include "bind.h"

/* fetch_begin(key, budget_ns, poll_ns) -> (status, value, token, waited)
 * status 0: hit (value); 1: this process fetches (token); 2: waited the whole
 * budget; 3: fetch without a lease; 4: busy (budget 0). See lease.c. */
static PyObject *Table_fetch_begin(TableObject *self, PyObject *args)
{
    PyObject *key;
    long long budget_ns, poll_ns;
    if (!PyArg_ParseTuple(args, "OLL", &key, &budget_ns, &poll_ns))
        return NULL;
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    vela_fetch_status status;
    vela_lease_token token;
    int waited = 0;
    raw_copy c = {NULL, 0};
    vela_reader reader = {bind_copy_raw, bind_drop_raw, &c};
    vela_err err = vela_fetch_begin(t, &kb.key, budget_ns, poll_ns, &reader, &status, &token, &waited);
    if (err != VELA_OK)
        return err == VELA_ECALLER ? NULL : bind_raise(err);
    if (waited)
        VELA_COUNT(t, VELA_STAT_STAMPEDE_WAITS);
    if (status == VELA_FETCH_HIT) {
        VELA_COUNT(t, VELA_STAT_HITS);
        PyObject *value = vela_decode_finish(c.codec, c.raw, self->loaders);
        if (!value)
            return NULL;
        return Py_BuildValue("(iNOO)", (int)status, value, Py_None, waited ? Py_True : Py_False);
    }
    if (status == VELA_FETCH_BUSY)
        return Py_BuildValue("(iOOO)", (int)status, Py_None, Py_None, Py_False);
    VELA_COUNT(t, VELA_STAT_MISSES);
    if (status == VELA_FETCH_TIMEOUT)
        VELA_COUNT(t, VELA_STAT_STAMPEDE_TIMEOUTS);
    if (status != VELA_FETCH_MINE)
        return Py_BuildValue("(iOOO)", (int)status, Py_None, Py_None, waited ? Py_True : Py_False);
    return Py_BuildValue("(iO(IIK)O)", (int)status, Py_None, token.stripe, token.slot,
                         (unsigned long long)token.hash, waited ? Py_True : Py_False);
}

static int parse_token(PyObject *obj, vela_lease_token *token)
{
    unsigned long long hash;
    if (!PyArg_ParseTuple(obj, "IIK", &token->stripe, &token->slot, &hash))
        return -1;
    token->hash = hash;
    return 0;
}

/* fetch_complete(token, key, value, ttl_ns, tags): store and release the lease. */
static PyObject *Table_fetch_complete(TableObject *self, PyObject *args)
{
    PyObject *tok, *key, *value, *tags;
    long long ttl_ns;
    if (!PyArg_ParseTuple(args, "OOOLO", &tok, &key, &value, &ttl_ns, &tags))
        return NULL;
    READY_OR_NULL(self);
    vela_lease_token token;
    vela_keybuf kb;
    vela_valbuf vb;
    uint64_t taghashes[VELA_MAX_TAGS];
    Py_ssize_t ntags;
    if (parse_token(tok, &token) < 0)
        return NULL;
    if ((ntags = vela_encode_tags(tags, taghashes)) < 0 || vela_encode_key(key, &kb) < 0 ||
        vela_encode_value(value, self->dumps, self->dumps_codec, &vb) < 0) {
        /* the value cannot be stored: release the lease so waiters fetch */
        PyObject *type, *val, *tb;
        PyErr_Fetch(&type, &val, &tb);
        vela_fetch_complete(&self->t, &token, NULL);
        PyErr_Restore(type, val, tb);
        return NULL;
    }
    vela_put_args a = {.key = &kb.key, .value = vb.bytes, .value_len = vb.len, .codec = vb.codec,
                       .expire_at = bind_expire_at(&self->t, ttl_ns), .tags = taghashes,
                       .ntags = (size_t)ntags};
    vela_err err = vela_fetch_complete(&self->t, &token, &a);
    vela_valbuf_release(&vb);
    if (err != VELA_OK)
        return bind_raise(err);
    Py_RETURN_NONE;
}

static PyObject *Table_fetch_abort(TableObject *self, PyObject *tok)
{
    READY_OR_NULL(self);
    vela_lease_token token;
    if (parse_token(tok, &token) < 0)
        return NULL;
    vela_err err = vela_fetch_complete(&self->t, &token, NULL);
    if (err != VELA_OK)
        return bind_raise(err);
    Py_RETURN_NONE;
}

static PyObject *Table_release_leases(TableObject *self, PyObject *pid)
{
    READY_OR_NULL(self);
    long p = PyLong_AsLong(pid);
    if (p == -1 && PyErr_Occurred())
        return NULL;
    uint32_t n;
    Py_BEGIN_ALLOW_THREADS
    n = vela_leases_release_pid(&self->t, (uint32_t)p);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(n);
}

PyMethodDef bind_lease_methods[] = {
    {"fetch_begin", (PyCFunction)Table_fetch_begin, METH_VARARGS, "fetch_begin(key, budget_ns, poll_ns)"},
    {"fetch_complete", (PyCFunction)Table_fetch_complete, METH_VARARGS, "fetch_complete(token, key, value, ttl_ns, tags)"},
    {"fetch_abort", (PyCFunction)Table_fetch_abort, METH_O, "fetch_abort(token)"},
    {"release_leases", (PyCFunction)Table_release_leases, METH_O, "release_leases(pid) -> released"},
    {NULL, NULL, 0, NULL},
};

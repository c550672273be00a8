/*
 * bind_testhooks.c -- hooks for the crash tests only.
 */
#include "bind.h"

/* debug_stall(phase, key, value): a put that stops forever at `phase` while it
 * holds its locks, so crash tests can SIGKILL it at a known point. Phase 8
 * (inside an arena refill) needs a put that refills: the key's stripe gives
 * its arena back first. */
static PyObject *Table_debug_stall(TableObject *self, PyObject *args)
{
    int phase;
    PyObject *key, *value;
    if (!PyArg_ParseTuple(args, "iOO", &phase, &key, &value))
        return NULL;
    vela_keybuf kb;
    vela_table *t = bind_keyed(self, key, &kb);
    if (!t)
        return NULL;
    vela_err err = phase == 8 ? vela_arena_give_back(t, vela_stripe_of(t, kb.key.hash)) : VELA_OK;
    if (err != VELA_OK)
        return bind_raise(err);
    vela_valbuf vb;
    if (vela_encode_value(value, self->dumps, self->dumps_codec, &vb) < 0)
        return NULL;
    vela_put_args a = {.key = &kb.key, .value = vb.bytes, .value_len = vb.len, .codec = vb.codec};
    vela_debug_stall_phase = phase;
    err = vela_put(t, &a);
    vela_debug_stall_phase = 0;
    vela_valbuf_release(&vb);
    if (err != VELA_OK)
        return bind_raise(err);
    Py_RETURN_NONE;
}

PyMethodDef bind_testhook_methods[] = {
    {"debug_stall", (PyCFunction)Table_debug_stall, METH_VARARGS, "test hook: a put that stops at a phase"},
    {NULL, NULL, 0, NULL},
};

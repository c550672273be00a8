/*
 * bind.h -- what the files of the binding (module.c, bind_*.c) share: the
 * Table object, the prologue and epilogue every method has, conversions, and
 * each file's method table (module.c puts them together into the type).
 * The work itself lives in the core files of native/.
 */
#ifndef VELA_BIND_H
#define VELA_BIND_H

#include "binding.h"

typedef struct {
    PyObject_HEAD
    vela_table t;
    int open;
    uint64_t fork_generation;
    PyObject *dumps;
    int dumps_codec;
    PyObject *loaders[VELA_CODEC_COUNT];
    /* local objects (bind_objects.c): an OrderedDict key -> (version, decoded
     * value), at most objects_max of them, the oldest kept first; NULL when the
     * handle keeps none. objects_stamp: the
     * helpers of vela.stamp they are read with, (Stamped, as_read, READING). */
    PyObject *objects;
    Py_ssize_t objects_max;
    PyObject *objects_stamp;
} TableObject;

/* ---- errors and the handle (bind_common.c) --------------------------------- */
extern PyObject *bind_errors_module;
extern uint64_t bind_fork_generation;
void bind_after_fork(void);
/* The exception class of a C error (vela.errors). */
PyObject *bind_error_class(vela_err err);
/* Raise the exception for err (VELA_ECALLER: the callback's exception
 * stands); always returns NULL. */
PyObject *bind_raise(vela_err err);
/* 1 when the handle is open (and counts in this process's stats slot). */
int bind_ready(TableObject *self);
#define READY_OR_NULL(self) do { if (!bind_ready(self)) return NULL; } while (0)
/* The prologue of a method on one key: the handle is open and the key
 * encodes. Returns the table, or NULL with the exception set. */
vela_table *bind_keyed(TableObject *self, PyObject *key, vela_keybuf *kb);
/* The epilogue: `result` when err is VELA_OK, else NULL with the exception
 * (result is released). */
PyObject *bind_result(vela_err err, PyObject *result);

/* ---- conversions (bind_common.c) ------------------------------------------- */
/* Expiry on the segment's clock for a ttl in ns (0: never). */
int64_t bind_expire_at(vela_table *t, long long ttl_ns);
/* Remaining ns of an expiry (0 = never, -1 = already expired). */
long long bind_remaining(int64_t expire_at, int64_t now);
PyObject *bind_tags_tuple(const uint64_t *tags, size_t n);
/* A key already encoded (bytes, the bridge's). */
int bind_raw_key(PyObject *obj, vela_keybuf *kb);
/* Tag ids given as ints (the bridge's); the count or -1. */
Py_ssize_t bind_tag_ints(PyObject *tags, uint64_t out[VELA_MAX_TAGS]);
int bind_check_parts(unsigned int parts);

/* The reader the core copies a found value out with: the raw object for the
 * stored bytes (a serializer's loader runs later, with no lock held). */
typedef struct raw_copy {
    PyObject *raw;
    uint8_t codec;
} raw_copy;
int bind_copy_raw(void *ctx, uint8_t codec, const uint8_t *value, uint32_t len);
void bind_drop_raw(void *ctx, int copied);
/* Find k and, with `value`, decode it. 1 found, 0 absent, -1 error.
 * count: 0 nothing, 1 a hit or a miss, 2 only a hit. */
int bind_lookup(TableObject *self, const vela_key *k, PyObject **value, int count);
/* bind_lookup, also giving the version of the entry decoded (0 when absent). */
int bind_lookup_versioned(TableObject *self, const vela_key *k, PyObject **value, int count, uint64_t *version);
/* The arguments of get(key, default=None) (FASTCALL|KEYWORDS); 0, or -1 with TypeError. */
int bind_get_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **key, PyObject **dflt);

/* ---- the method tables, one per concern ------------------------------------ */
extern PyMethodDef bind_table_methods[];     /* bind_table.c: the worker API, one key */
extern PyMethodDef bind_batch_methods[];     /* bind_batch.c: many keys */
extern PyMethodDef bind_near_methods[];      /* bind_near.c: near-cache fills */
extern PyMethodDef bind_objects_methods[];   /* bind_objects.c: decoded values kept per process */
extern PyMethodDef bind_lease_methods[];     /* bind_lease.c: stampede leases */
extern PyMethodDef bind_inspect_methods[];   /* bind_inspect.c: counters, check, views */
extern PyMethodDef bind_bridge_methods[];    /* bind_bridge.c: the bridge's side */
extern PyMethodDef bind_route_methods[];     /* bind_route.c: partitioned routing */
extern PyMethodDef bind_testhook_methods[];  /* bind_testhooks.c */

/* bind_dataserver.c: adds the DataServer type (the bridge's native data port). */
int bind_dataserver_add(PyObject *module);
/* module.c: 1 when o is a Table (or a BridgeTable). */
int bind_is_table(PyObject *o);

#endif /* VELA_BIND_H */

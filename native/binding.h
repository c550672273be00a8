/*
 * binding.h -- what module.c and codec.c share: conversions between Python
 * objects and the bytes the table stores. Python-facing code only.
 */
#ifndef VELA_BINDING_H
#define VELA_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "vela.h"

/* An encoded key: canonical bytes (the same key gives the same bytes in every
 * process and on every host) plus their xxh3-64 hash. */
typedef struct vela_keybuf {
    uint8_t bytes[VELA_MAX_KEY];
    vela_key key;
} vela_keybuf;

/* 0 on success; -1 with TypeError (unsupported type) or ValueError (too long). */
int vela_encode_key(PyObject *obj, vela_keybuf *out);

/* A key already encoded (the bridge's): copied and hashed. */
int vela_key_from_bytes(const uint8_t *bytes, size_t len, vela_keybuf *out);

/* The key object of an encoding (inverse of vela_encode_key). */
PyObject *vela_decode_key(const uint8_t *bytes, size_t len);

/* A value ready to store: points into `owned` (or the object itself, or `word`). */
typedef struct vela_valbuf {
    const uint8_t *bytes;
    size_t len;
    uint8_t codec;
    int64_t word;
    PyObject *owned; /* serializer output to release after the put */
} vela_valbuf;

/* 0 on success; -1 with TypeError when the serializer rejects the value. */
int vela_encode_value(PyObject *value, PyObject *dumps, int dumps_codec, vela_valbuf *out);
void vela_valbuf_release(vela_valbuf *v);

/* Object for stored bytes. For serializer codecs it returns the raw bytes and
 * the caller runs the loader after releasing the stripe lock. */
PyObject *vela_decode_raw(uint8_t codec, const uint8_t *bytes, size_t len);
/* Finish decoding: runs loaders[codec] on raw bytes (steals `raw`). */
PyObject *vela_decode_finish(uint8_t codec, PyObject *raw, PyObject *const *loaders);

/* Tags: a sequence of str -> hashes (deduplicated). Returns the count or -1. */
Py_ssize_t vela_encode_tags(PyObject *tags, uint64_t out[VELA_MAX_TAGS]);
uint64_t vela_hash_tag(const char *utf8, size_t len);

#endif

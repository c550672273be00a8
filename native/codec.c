/*
 * codec.c -- Python objects <-> stored bytes.
 *
 * Keys are encoded canonically, type first, so "1", 1 and b"1" are three
 * different keys while True and 1 are one (as in a dict):
 *   str   's' + UTF-8            bytes 'b' + bytes
 *   int   'i' + 8 bytes big-endian two's complement when it fits int64,
 *         'I' + decimal digits otherwise
 *   tuple 't' + for each item: 4-byte big-endian length + its encoding
 * Values of exact type bytes, str and int (int64) are stored as they are;
 * everything else goes through the handle's serializer.
 */
#define XXH_INLINE_ALL
#include "xxhash.h"

#include "binding.h"

#define MAX_DEPTH 16

static int too_long(void)
{
    PyErr_Format(PyExc_ValueError, "key is longer than %d bytes once encoded", VELA_MAX_KEY);
    return -1;
}

static int put_bytes(uint8_t *buf, size_t *pos, char tag, const void *src, size_t len)
{
    if (*pos + 1 + len > VELA_MAX_KEY)
        return too_long();
    buf[(*pos)++] = (uint8_t)tag;
    memcpy(buf + *pos, src, len);
    *pos += len;
    return 0;
}

static int encode_into(PyObject *obj, uint8_t *buf, size_t *pos, int depth)
{
    if (PyUnicode_Check(obj)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
        if (!s)
            return -1;
        return put_bytes(buf, pos, 's', s, (size_t)n);
    }
    if (PyBytes_Check(obj))
        return put_bytes(buf, pos, 'b', PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj));
    if (PyLong_Check(obj)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (!overflow) {
            uint8_t be[8];
            uint64_t u = (uint64_t)v;
            for (int i = 7; i >= 0; i--, u >>= 8)
                be[i] = (uint8_t)u;
            return put_bytes(buf, pos, 'i', be, 8);
        }
        PyObject *digits = PyObject_Str(obj);
        if (!digits)
            return -1;
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(digits, &n);
        int rc = s ? put_bytes(buf, pos, 'I', s, (size_t)n) : -1;
        Py_DECREF(digits);
        return rc;
    }
    if (PyTuple_Check(obj)) {
        if (depth >= MAX_DEPTH) {
            PyErr_Format(PyExc_ValueError, "key tuples may nest at most %d deep", MAX_DEPTH);
            return -1;
        }
        if (*pos + 1 > VELA_MAX_KEY)
            return too_long();
        buf[(*pos)++] = 't';
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(obj); i++) {
            if (*pos + 4 > VELA_MAX_KEY)
                return too_long();
            size_t at = *pos;
            *pos += 4;
            if (encode_into(PyTuple_GET_ITEM(obj, i), buf, pos, depth + 1) < 0)
                return -1;
            uint32_t len = (uint32_t)(*pos - at - 4);
            buf[at] = (uint8_t)(len >> 24);
            buf[at + 1] = (uint8_t)(len >> 16);
            buf[at + 2] = (uint8_t)(len >> 8);
            buf[at + 3] = (uint8_t)len;
        }
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "cache keys must be str, bytes, int or tuples of them, not %.100s",
                 Py_TYPE(obj)->tp_name);
    return -1;
}

int vela_key_from_bytes(const uint8_t *bytes, size_t len, vela_keybuf *out)
{
    if (len > VELA_MAX_KEY)
        return too_long();
    memcpy(out->bytes, bytes, len);
    out->key.bytes = out->bytes;
    out->key.len = len;
    out->key.hash = XXH3_64bits(out->bytes, len);
    return 0;
}

int vela_encode_key(PyObject *obj, vela_keybuf *out)
{
    size_t len = 0;
    if (encode_into(obj, out->bytes, &len, 0) < 0)
        return -1;
    out->key.bytes = out->bytes;
    out->key.len = len;
    out->key.hash = XXH3_64bits(out->bytes, len);
    return 0;
}

int vela_encode_value(PyObject *value, PyObject *dumps, int dumps_codec, vela_valbuf *out)
{
    out->owned = NULL;
    if (PyBytes_CheckExact(value)) {
        out->bytes = (const uint8_t *)PyBytes_AS_STRING(value);
        out->len = (size_t)PyBytes_GET_SIZE(value);
        out->codec = VELA_CODEC_BYTES;
        return 0;
    }
    if (PyUnicode_CheckExact(value)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(value, &n);
        if (s) {
            out->bytes = (const uint8_t *)s;
            out->len = (size_t)n;
            out->codec = VELA_CODEC_STR;
            return 0;
        }
        PyErr_Clear(); /* lone surrogates: leave it to the serializer */
    }
    if (PyLong_CheckExact(value)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (!(v == -1 && PyErr_Occurred()) && !overflow) {
            out->word = v;
            out->bytes = (const uint8_t *)&out->word;
            out->len = 8;
            out->codec = VELA_CODEC_INT;
            return 0;
        }
        PyErr_Clear();
    }
    if (!dumps || dumps == Py_None) {
        PyErr_Format(PyExc_TypeError, "a value of type %.100s needs a serializer", Py_TYPE(value)->tp_name);
        return -1;
    }
    PyObject *data = PyObject_CallOneArg(dumps, value);
    if (!data) {
        PyObject *type, *val, *tb;
        PyErr_Fetch(&type, &val, &tb);
        PyErr_NormalizeException(&type, &val, &tb);
        PyErr_Format(PyExc_TypeError, "cannot serialize a value of type %.100s: %S",
                     Py_TYPE(value)->tp_name, val ? val : Py_None);
        PyObject *t2, *v2, *tb2;
        PyErr_Fetch(&t2, &v2, &tb2);
        PyErr_NormalizeException(&t2, &v2, &tb2);
        if (val)
            PyException_SetCause(v2, val); /* steals val */
        PyErr_Restore(t2, v2, tb2);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        return -1;
    }
    if (!PyBytes_Check(data)) {
        PyErr_Format(PyExc_TypeError, "the serializer's dumps returned %.100s, not bytes",
                     Py_TYPE(data)->tp_name);
        Py_DECREF(data);
        return -1;
    }
    out->owned = data;
    out->bytes = (const uint8_t *)PyBytes_AS_STRING(data);
    out->len = (size_t)PyBytes_GET_SIZE(data);
    out->codec = (uint8_t)dumps_codec;
    return 0;
}

/* Inverse of encode_into for one item of `len` bytes at `p`. */
static PyObject *decode_from(const uint8_t *p, size_t len, int depth)
{
    if (len == 0 || depth > MAX_DEPTH)
        goto bad;
    switch (p[0]) {
    case 's':
        return PyUnicode_DecodeUTF8((const char *)p + 1, (Py_ssize_t)len - 1, "strict");
    case 'b':
        return PyBytes_FromStringAndSize((const char *)p + 1, (Py_ssize_t)len - 1);
    case 'i': {
        if (len != 9)
            goto bad;
        uint64_t u = 0;
        for (int i = 1; i < 9; i++)
            u = u << 8 | p[i];
        return PyLong_FromLongLong((long long)u);
    }
    case 'I': {
        PyObject *digits = PyUnicode_DecodeASCII((const char *)p + 1, (Py_ssize_t)len - 1, "strict");
        if (!digits)
            return NULL;
        PyObject *v = PyLong_FromUnicodeObject(digits, 10);
        Py_DECREF(digits);
        return v;
    }
    case 't': {
        PyObject *items = PyList_New(0);
        size_t pos = 1;
        while (items && pos < len) {
            if (pos + 4 > len)
                break;
            size_t n = (size_t)p[pos] << 24 | (size_t)p[pos + 1] << 16 | (size_t)p[pos + 2] << 8 | p[pos + 3];
            pos += 4;
            PyObject *item = pos + n <= len ? decode_from(p + pos, n, depth + 1) : NULL;
            if (!item || PyList_Append(items, item) < 0)
                Py_CLEAR(items);
            Py_XDECREF(item);
            pos += n;
        }
        if (!items)
            return NULL;
        if (pos != len) {
            Py_DECREF(items);
            goto bad;
        }
        PyObject *tuple = PyList_AsTuple(items);
        Py_DECREF(items);
        return tuple;
    }
    }
bad:
    PyErr_SetString(PyExc_ValueError, "not a Vela key encoding");
    return NULL;
}

PyObject *vela_decode_key(const uint8_t *bytes, size_t len)
{
    return decode_from(bytes, len, 0);
}

void vela_valbuf_release(vela_valbuf *v)
{
    Py_CLEAR(v->owned);
}

PyObject *vela_decode_raw(uint8_t codec, const uint8_t *bytes, size_t len)
{
    switch (codec) {
    case VELA_CODEC_STR:
        return PyUnicode_DecodeUTF8((const char *)bytes, (Py_ssize_t)len, "strict");
    case VELA_CODEC_INT: {
        int64_t v = 0;
        if (len == 8)
            memcpy(&v, bytes, 8);
        return PyLong_FromLongLong(v);
    }
    default:
        return PyBytes_FromStringAndSize((const char *)bytes, (Py_ssize_t)len);
    }
}

PyObject *vela_decode_finish(uint8_t codec, PyObject *raw, PyObject *const *loaders)
{
    if (codec < VELA_CODEC_PICKLE || !raw)
        return raw;
    PyObject *loads = codec < VELA_CODEC_COUNT ? loaders[codec] : NULL;
    if (!loads) {
        Py_DECREF(raw);
        PyErr_Format(PyExc_TypeError, "the value was stored by a serializer (codec %d) this handle "
                     "does not have", codec);
        return NULL;
    }
    PyObject *v = PyObject_CallOneArg(loads, raw);
    Py_DECREF(raw);
    return v;
}

uint64_t vela_hash_tag(const char *utf8, size_t len)
{
    return XXH3_64bits(utf8, len);
}

Py_ssize_t vela_encode_tags(PyObject *tags, uint64_t out[VELA_MAX_TAGS])
{
    if (!tags || tags == Py_None)
        return 0;
    if (PyUnicode_Check(tags)) {
        PyErr_SetString(PyExc_TypeError, "tags must be an iterable of str, not a single str");
        return -1;
    }
    PyObject *seq = PySequence_Fast(tags, "tags must be an iterable of str");
    if (!seq)
        return -1;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *tag = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyUnicode_Check(tag)) {
            PyErr_Format(PyExc_TypeError, "tags must be str, not %.100s", Py_TYPE(tag)->tp_name);
            goto fail;
        }
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(tag, &len);
        if (!s)
            goto fail;
        if (len == 0 || len > 255) {
            PyErr_Format(PyExc_ValueError, "a tag must be 1 to 255 bytes of UTF-8, not %zd", len);
            goto fail;
        }
        uint64_t h = vela_hash_tag(s, (size_t)len);
        int dup = 0;
        for (Py_ssize_t j = 0; j < n; j++)
            dup |= (out[j] & VELA_TAG_MASK) == (h & VELA_TAG_MASK);
        if (dup)
            continue;
        if (n == VELA_MAX_TAGS) {
            PyErr_Format(PyExc_ValueError, "an entry may carry at most %d tags", VELA_MAX_TAGS);
            goto fail;
        }
        out[n++] = h;
    }
    Py_DECREF(seq);
    return n;
fail:
    Py_DECREF(seq);
    return -1;
}

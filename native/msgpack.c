/*
 * msgpack.c -- see msgpack.h (the format: github.com/msgpack/msgpack/blob/master/spec.md).
 */
#include "msgpack.h"

#include <stdlib.h>
#include <string.h>

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

int vela_mp_next(vela_mp_reader *r, vela_mp_obj *o)
{
    if (r->p >= r->end)
        return -1;
    uint8_t c = *r->p++;
    size_t avail = (size_t)(r->end - r->p);
    int n = 0;     /* bytes of a length or number that follow */
    int body = 0;  /* 1: `len` bytes of data follow */
    if (c <= 0x7f) {
        o->type = VELA_MP_UINT, o->u = c;
        return 0;
    }
    if (c >= 0xe0) {
        o->type = VELA_MP_NEG, o->u = (uint64_t)(int64_t)(int8_t)c;
        return 0;
    }
    if ((c & 0xf0) == 0x80 || (c & 0xf0) == 0x90) {
        o->type = (c & 0xf0) == 0x80 ? VELA_MP_MAP : VELA_MP_ARRAY, o->len = c & 0x0f;
        return 0;
    }
    if ((c & 0xe0) == 0xa0) {
        o->type = VELA_MP_STR, o->len = c & 0x1f, body = 1;
    } else {
        switch (c) {
        case 0xc0: o->type = VELA_MP_NIL; return 0;
        case 0xc2: case 0xc3: o->type = VELA_MP_BOOL, o->u = c == 0xc3; return 0;
        case 0xc4: case 0xc5: case 0xc6: o->type = VELA_MP_BIN, n = 1 << (c - 0xc4), body = 1; break;
        case 0xd9: case 0xda: case 0xdb: o->type = VELA_MP_STR, n = 1 << (c - 0xd9), body = 1; break;
        case 0xcc: case 0xcd: case 0xce: case 0xcf: o->type = VELA_MP_UINT, n = 1 << (c - 0xcc); break;
        case 0xd0: case 0xd1: case 0xd2: case 0xd3: o->type = VELA_MP_NEG, n = 1 << (c - 0xd0); break;
        case 0xdc: case 0xdd: o->type = VELA_MP_ARRAY, n = 2 << (c - 0xdc); break;
        case 0xde: case 0xdf: o->type = VELA_MP_MAP, n = 2 << (c - 0xde); break;
        default: return -1; /* floats, extensions, the reserved byte */
        }
        if (avail < (size_t)n)
            return -1;
        uint64_t v = be(r->p, n);
        r->p += n, avail -= (size_t)n;
        if (o->type == VELA_MP_UINT) {
            o->u = v;
            return 0;
        }
        if (o->type == VELA_MP_NEG) {
            int64_t s = n == 1 ? (int8_t)v : n == 2 ? (int16_t)v : n == 4 ? (int32_t)v : (int64_t)v;
            if (s >= 0)
                o->type = VELA_MP_UINT;
            o->u = (uint64_t)s;
            return 0;
        }
        if (v > UINT32_MAX)
            return -1;
        o->len = (uint32_t)v;
    }
    if (body) {
        if (avail < o->len)
            return -1;
        o->data = r->p;
        r->p += o->len;
    }
    return 0;
}

int vela_buf_reserve(vela_buf *b, size_t more)
{
    if (b->failed)
        return -1;
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) {
        b->failed = 1;
        return -1;
    }
    b->p = p, b->cap = cap;
    return 0;
}

void vela_buf_put(vela_buf *b, const void *data, size_t len)
{
    if (len && vela_buf_reserve(b, len) == 0) {
        memcpy(b->p + b->len, data, len);
        b->len += len;
    }
}

void vela_buf_free(vela_buf *b)
{
    free(b->p);
    b->p = NULL, b->len = b->cap = 0, b->failed = 0;
}

/* A type byte, then v in n big-endian bytes. */
static void head(vela_buf *b, uint8_t type, uint64_t v, int n)
{
    uint8_t out[9] = {type};
    for (int i = 0; i < n; i++)
        out[1 + i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    vela_buf_put(b, out, 1 + (size_t)n);
}

static void sized(vela_buf *b, uint32_t len, uint8_t fix, uint32_t fixmax, uint8_t t8, uint8_t t16, uint8_t t32)
{
    if (len <= fixmax && fix)
        head(b, (uint8_t)(fix | len), 0, 0);
    else if (len <= 0xff && t8)
        head(b, t8, len, 1);
    else if (len <= 0xffff)
        head(b, t16, len, 2);
    else
        head(b, t32, len, 4);
}

void vela_mp_map(vela_buf *b, uint32_t n)
{
    sized(b, n, 0x80, 15, 0, 0xde, 0xdf);
}

void vela_mp_array(vela_buf *b, uint32_t n)
{
    sized(b, n, 0x90, 15, 0, 0xdc, 0xdd);
}

void vela_mp_str(vela_buf *b, const char *s)
{
    size_t len = strlen(s);
    sized(b, (uint32_t)len, 0xa0, 31, 0xd9, 0xda, 0xdb);
    vela_buf_put(b, s, len);
}

void vela_mp_bin(vela_buf *b, const void *data, uint32_t len)
{
    sized(b, len, 0, 0, 0xc4, 0xc5, 0xc6);
    vela_buf_put(b, data, len);
}

void vela_mp_uint(vela_buf *b, uint64_t v)
{
    if (v <= 0x7f)
        head(b, (uint8_t)v, 0, 0);
    else if (v <= 0xff)
        head(b, 0xcc, v, 1);
    else if (v <= 0xffff)
        head(b, 0xcd, v, 2);
    else if (v <= 0xffffffffu)
        head(b, 0xce, v, 4);
    else
        head(b, 0xcf, v, 8);
}

void vela_mp_int(vela_buf *b, int64_t v)
{
    if (v >= 0)
        vela_mp_uint(b, (uint64_t)v);
    else if (v >= -32)
        head(b, (uint8_t)(int8_t)v, 0, 0);
    else
        head(b, 0xd3, (uint64_t)v, 8);
}

void vela_mp_bool(vela_buf *b, int v)
{
    head(b, v ? 0xc3 : 0xc2, 0, 0);
}

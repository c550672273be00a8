/*
 * msgpack.h -- the little of MessagePack the native data port speaks
 * (dataserver.c): reading a flat map of scalars, writing a reply. Anything it
 * does not read (floats, extensions, nested containers) is left to the Python
 * path, which reads everything (vela/bridge/protocol.py).
 */
#ifndef VELA_MSGPACK_H
#define VELA_MSGPACK_H

#include <stddef.h>
#include <stdint.h>

enum vela_mp_type { VELA_MP_NIL, VELA_MP_BOOL, VELA_MP_UINT, VELA_MP_NEG, VELA_MP_STR, VELA_MP_BIN,
                    VELA_MP_ARRAY, VELA_MP_MAP };

typedef struct {
    enum vela_mp_type type;
    uint64_t u;            /* BOOL, UINT; NEG: the two's complement of a negative int */
    const uint8_t *data;   /* STR, BIN */
    uint32_t len;          /* STR, BIN: bytes; ARRAY, MAP: items (their contents follow, unread) */
} vela_mp_obj;

typedef struct {
    const uint8_t *p, *end;
} vela_mp_reader;

/* The next object; -1 when the input ends inside it or holds a type not read here. */
int vela_mp_next(vela_mp_reader *r, vela_mp_obj *o);

/* A growing output buffer; `failed` once an allocation failed (its bytes are then void). */
typedef struct {
    uint8_t *p;
    size_t len, cap;
    int failed;
} vela_buf;

int vela_buf_reserve(vela_buf *b, size_t more);
void vela_buf_put(vela_buf *b, const void *data, size_t len);
void vela_buf_free(vela_buf *b);

void vela_mp_map(vela_buf *b, uint32_t n);
void vela_mp_array(vela_buf *b, uint32_t n);
void vela_mp_str(vela_buf *b, const char *s);
void vela_mp_bin(vela_buf *b, const void *data, uint32_t len);
void vela_mp_uint(vela_buf *b, uint64_t v);
void vela_mp_int(vela_buf *b, int64_t v);
void vela_mp_bool(vela_buf *b, int v);

#endif

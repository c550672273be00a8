/*
 * sha256.h -- SHA-256 and HMAC-SHA256 (FIPS 180-4, RFC 2104), for the bridge's
 * native data port (dataserver.c): it authenticates requests and replies
 * exactly as vela/bridge/protocol.py does with Python's hmac, without the GIL.
 */
#ifndef VELA_SHA256_H
#define VELA_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define VELA_SHA256_BYTES 32

typedef struct {
    uint32_t h[8];
    uint64_t bytes;
    uint8_t block[64];
    size_t fill;
} vela_sha256;

void vela_sha256_init(vela_sha256 *s);
void vela_sha256_update(vela_sha256 *s, const void *data, size_t len);
void vela_sha256_final(vela_sha256 *s, uint8_t out[VELA_SHA256_BYTES]);

/* A secret's two keyed states (the key block xor ipad, xor opad), computed once:
 * each MAC then costs two hashes of its own data. */
typedef struct {
    vela_sha256 inner, outer;
} vela_hmac_key;

void vela_hmac_key_init(vela_hmac_key *k, const uint8_t *secret, size_t len);
/* HMAC of a || b (either may be empty). */
void vela_hmac2(const vela_hmac_key *k, const void *a, size_t alen, const void *b, size_t blen,
                uint8_t out[VELA_SHA256_BYTES]);
/* 1 when the n bytes of x and y are equal, in time that does not depend on where they differ. */
int vela_equal_ct(const uint8_t *x, const uint8_t *y, size_t n);

#endif

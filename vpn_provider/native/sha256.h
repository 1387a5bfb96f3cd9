/* SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104).
 * Self-contained so the node relay helper needs no OpenSSL and stays
 * about 1 MB resident. */
#ifndef VPN_PROVIDER_SHA256_H
#define VPN_PROVIDER_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define SHA256_SIZE 32

struct sha256 { uint32_t h[8]; uint64_t length; uint8_t block[64]; size_t used; };

void sha256_init(struct sha256 *s);
void sha256_update(struct sha256 *s, const void *data, size_t n);
void sha256_final(struct sha256 *s, uint8_t out[SHA256_SIZE]);
void hmac_sha256(const uint8_t *key, size_t key_len, const void *msg, size_t msg_len, uint8_t out[SHA256_SIZE]);
/* constant-time comparison: 1 if equal */
int digest_equal(const uint8_t *a, const uint8_t *b, size_t n);

#endif

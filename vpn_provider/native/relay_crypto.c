/* The relay protocol's cryptography on the node: see relay_crypto.h, and protocol.py and
 * records.py for the spec this must match byte for byte. */
#define _GNU_SOURCE
#include "relay_crypto.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#define AES_KEY_SIZE 16
#define GCM_NONCE 12
#define EPOCH_RECORDS (1u << 20)  /* records.py EPOCH_RECORDS */

static EVP_CIPHER *aes_gcm;  /* fetched once: a fetch per flow or per record would cost */
static EVP_KDF *hkdf_kdf;
static pthread_once_t fetched = PTHREAD_ONCE_INIT;
static __thread const char *failure;
static __thread char failure_text[200];

static void fetch_algorithms(void)
{
    /* No openssl.cnf (its modules and tables cost every helper heap, and a site's config must
     * not change our cipher) and no error strings: both would only grow the helper. */
    OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG | OPENSSL_INIT_NO_LOAD_CRYPTO_STRINGS, NULL);
    aes_gcm = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
    hkdf_kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
}

const char *relay_crypto_error(void)
{
    return failure ? failure : "unknown failure";
}

static int fail(const char *why)
{
    failure = why;
    return -1;
}

/* libcrypto said no: its reason, and an empty error queue for the thread's next flow. */
static int crypto_failed(const char *doing)
{
    const char *reason = ERR_reason_error_string(ERR_get_error());
    ERR_clear_error();
    snprintf(failure_text, sizeof failure_text, "libcrypto failed to %s: %s", doing, reason ? reason : "no reason given");
    return fail(failure_text);
}

static int ready(void)
{
    pthread_once(&fetched, fetch_algorithms);
    return aes_gcm && hkdf_kdf ? 0 : crypto_failed("load AES-128-GCM and HKDF");
}

/* HKDF-SHA256 (RFC 5869); salt NULL: expand only, `secret` is already a pseudorandom key. */
static int hkdf(const uint8_t *secret, size_t secret_size, const uint8_t *salt, size_t salt_size,
                const void *info, size_t info_size, uint8_t *out, size_t out_size)
{
    int mode = salt ? EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND : EVP_KDF_HKDF_MODE_EXPAND_ONLY;
    OSSL_PARAM params[6], *p = params;
    *p++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0);
    *p++ = OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode);
    *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)secret, secret_size);
    *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, info_size);
    if (salt)
        *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, salt_size);
    *p = OSSL_PARAM_construct_end();
    EVP_KDF_CTX *ctx = EVP_KDF_CTX_new(hkdf_kdf);
    int ok = ctx && EVP_KDF_derive(ctx, out, out_size, params) > 0;
    EVP_KDF_CTX_free(ctx);
    return ok ? 0 : crypto_failed("derive keys (HKDF)");
}

/* records.py _expand: HKDF-Expand(secret, "vpnp " + label). */
static int expand(const uint8_t secret[RELAY_SECRET], const char *label, uint8_t *out, size_t size)
{
    char info[16];
    int n = snprintf(info, sizeof info, "vpnp %s", label);
    return hkdf(secret, RELAY_SECRET, NULL, 0, info, (size_t)n, out, size);
}

/* The AES key of the direction's current traffic secret, into its context (the same context
 * for the flow's life: a new epoch only sets a new key). */
static int key_direction(struct record_direction *d)
{
    uint8_t key[AES_KEY_SIZE];
    const EVP_CIPHER *first = EVP_CIPHER_CTX_get0_cipher(d->cipher) ? NULL : aes_gcm;
    int rc = expand(d->secret, "key", key, sizeof key);
    if (rc == 0 && !EVP_CipherInit_ex2(d->cipher, first, key, NULL, d->sealing, NULL))
        rc = crypto_failed("set an AES key");
    OPENSSL_cleanse(key, sizeof key);
    return rc;
}

static int start_direction(struct record_direction *d, const uint8_t secret[RELAY_SECRET], int sealing)
{
    memcpy(d->secret, secret, RELAY_SECRET);
    d->sealing = sealing;
    d->number = 0;
    if (!(d->cipher = EVP_CIPHER_CTX_new()))
        return crypto_failed("allocate a cipher context");
    return key_direction(d);
}

int record_direction_resume(struct record_direction *d, const uint8_t secret[RELAY_SECRET], uint64_t number,
                            int sealing)
{
    if (ready() < 0 || start_direction(d, secret, sealing) < 0)
        return -1;
    d->number = number;
    return 0;
}

void record_direction_end(struct record_direction *d)
{
    EVP_CIPHER_CTX_free(d->cipher);
    d->cipher = NULL;
    OPENSSL_cleanse(d->secret, sizeof d->secret);
}

/* The nonce of the direction's next record; then, as records.py's _next_nonce does, the next
 * epoch's secret and key once this record closes one (this record still uses the old key:
 * the caller set the IV, and with it the key in use, before calling). */
static int set_nonce(struct record_direction *d)
{
    uint8_t nonce[GCM_NONCE] = {0};
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (uint8_t)(d->number >> (56 - 8 * i));
    return EVP_CipherInit_ex2(d->cipher, NULL, NULL, nonce, d->sealing, NULL) ? 0 : crypto_failed("set a nonce");
}

static int next_record(struct record_direction *d)
{
    if (++d->number % EPOCH_RECORDS)
        return 0;
    uint8_t next[RELAY_SECRET];
    if (expand(d->secret, "next", next, sizeof next) < 0)
        return -1;
    memcpy(d->secret, next, sizeof next);
    OPENSSL_cleanse(next, sizeof next);
    return key_direction(d);
}

long record_body_size(const uint8_t header[RECORD_HEADER])
{
    size_t length = (size_t)header[1] << 16 | (size_t)header[2] << 8 | header[3];
    if ((header[0] != RECORD_DATA && header[0] != RECORD_END) || length > RECORD_MAX_PLAINTEXT)
        return fail("not a relay record (a different protocol, or altered on the way)");
    return (long)(length + RECORD_TAG);
}

long record_seal(struct record_direction *d, uint8_t *record, size_t length, enum record_type type)
{
    uint8_t *body = record + RECORD_HEADER;
    int n;
    record[0] = (uint8_t)type;
    record[1] = (uint8_t)(length >> 16);
    record[2] = (uint8_t)(length >> 8);
    record[3] = (uint8_t)length;
    if (set_nonce(d) < 0)
        return -1;
    /* GCM encrypts in place (input and output the same bytes): no copy, no second buffer. */
    if (!EVP_EncryptUpdate(d->cipher, NULL, &n, record, RECORD_HEADER)
        || (length && !EVP_EncryptUpdate(d->cipher, body, &n, body, (int)length))
        || !EVP_EncryptFinal_ex(d->cipher, body + length, &n)
        || !EVP_CIPHER_CTX_ctrl(d->cipher, EVP_CTRL_AEAD_GET_TAG, RECORD_TAG, body + length))
        return crypto_failed("seal a record");
    if (next_record(d) < 0)
        return -1;
    return (long)(RECORD_HEADER + length + RECORD_TAG);
}

long record_open(struct record_direction *d, uint8_t *record)
{
    long size = record_body_size(record);
    if (size < 0)
        return -1;
    size_t length = (size_t)size - RECORD_TAG;
    uint8_t *body = record + RECORD_HEADER;
    int n;
    if (set_nonce(d) < 0)
        return -1;
    if (!EVP_DecryptUpdate(d->cipher, NULL, &n, record, RECORD_HEADER)
        || (length && !EVP_DecryptUpdate(d->cipher, body, &n, body, (int)length))
        || !EVP_CIPHER_CTX_ctrl(d->cipher, EVP_CTRL_AEAD_SET_TAG, RECORD_TAG, body + length))
        return crypto_failed("open a record");
    if (EVP_DecryptFinal_ex(d->cipher, body + length, &n) <= 0) {
        ERR_clear_error();
        return fail("a record failed authentication (altered on the way)");
    }
    if (record[0] == RECORD_END && length)
        return fail("an end record with data");
    if (next_record(d) < 0)
        return -1;
    return (long)length;
}

int handshake_start(struct client_handshake *hs)
{
    uint8_t *nonce = hs->hello + RELAY_MAGIC_SIZE, *public = nonce + RELAY_NONCE;
    size_t size = RELAY_PUBLIC;
    memcpy(hs->hello, RELAY_MAGIC, RELAY_MAGIC_SIZE);
    hs->ephemeral = NULL;
    if (ready() < 0)
        return -1;
    if (RAND_bytes(nonce, RELAY_NONCE) != 1)
        return crypto_failed("make a nonce");
    if (!(hs->ephemeral = EVP_PKEY_Q_keygen(NULL, NULL, "X25519"))
        || !EVP_PKEY_get_raw_public_key(hs->ephemeral, public, &size) || size != RELAY_PUBLIC)
        return crypto_failed("make an X25519 key");
    return 0;
}

void handshake_end(struct client_handshake *hs)
{
    EVP_PKEY_free(hs->ephemeral);
    hs->ephemeral = NULL;
}

/* HMAC-SHA256(mac_key, side | th): each side's proof that it holds the relay key. */
static int proof_of(const uint8_t mac_key[RELAY_MAC], const char *side, const uint8_t th[32], uint8_t out[RELAY_MAC])
{
    uint8_t message[8 + 32];
    size_t side_size = strlen(side), size = 0;
    memcpy(message, side, side_size);
    memcpy(message + side_size, th, 32);
    if (!EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, mac_key, RELAY_MAC, message, side_size + 32, out, RELAY_MAC, &size)
        || size != RELAY_MAC)
        return crypto_failed("compute an HMAC");
    return 0;
}

/* X25519(our ephemeral key, the server's): -1 for a share that gives no key (low order). */
static int shared_secret(EVP_PKEY *ours, const uint8_t *theirs, uint8_t out[32])
{
    EVP_PKEY *peer = EVP_PKEY_new_raw_public_key_ex(NULL, "X25519", NULL, theirs, RELAY_PUBLIC);
    EVP_PKEY_CTX *ctx = peer ? EVP_PKEY_CTX_new_from_pkey(NULL, ours, NULL) : NULL;
    size_t size = 32;
    int ok = ctx && EVP_PKEY_derive_init(ctx) > 0 && EVP_PKEY_derive_set_peer(ctx, peer) > 0
             && EVP_PKEY_derive(ctx, out, &size) > 0 && size == 32;
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(peer);
    if (!ok) {
        ERR_clear_error();
        return fail("a bad key share from the gateway");
    }
    return 0;
}

int handshake_finish(struct client_handshake *hs, const uint8_t key[RELAY_SECRET], const uint8_t *server_hello,
                     struct record_direction *sending, struct record_direction *receiving, uint8_t proof[RELAY_MAC])
{
    const size_t signed_size = SERVER_HELLO - RELAY_MAC;
    const uint8_t *server_public = server_hello + signed_size - RELAY_PUBLIC;
    uint8_t transcript[CLIENT_HELLO + SERVER_HELLO], info[12 + 32], shared[32], okm[3 * RELAY_SECRET], expected[RELAY_MAC];
    uint8_t *th = info + 12, *mac_key = okm + 2 * RELAY_SECRET;
    unsigned th_size = 0;
    int rc = -1;
    memcpy(transcript, hs->hello, CLIENT_HELLO);
    memcpy(transcript + CLIENT_HELLO, server_hello, signed_size);
    memcpy(info, "vpnp relay 3", 12);
    if (!EVP_Digest(transcript, CLIENT_HELLO + signed_size, th, &th_size, EVP_sha256(), NULL)) {
        crypto_failed("hash the handshake");
        goto out;
    }
    if (shared_secret(hs->ephemeral, server_public, shared) < 0
        || hkdf(shared, sizeof shared, key, RELAY_SECRET, info, sizeof info, okm, sizeof okm) < 0
        || proof_of(mac_key, "server", th, expected) < 0)
        goto out;
    if (CRYPTO_memcmp(expected, server_hello + signed_size, RELAY_MAC) != 0) {
        fail("the relay does not know this ticket's secret (a different gateway?)");
        goto out;
    }
    if (proof_of(mac_key, "client", th, proof) < 0 || start_direction(sending, okm, 1) < 0
        || start_direction(receiving, okm + RELAY_SECRET, 0) < 0)
        goto out;
    rc = 0;
out:
    OPENSSL_cleanse(shared, sizeof shared);
    OPENSSL_cleanse(okm, sizeof okm);
    return rc;
}

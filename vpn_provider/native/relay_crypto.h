/* The relay protocol's cryptography on the node (spec and Python twin: vpn_provider/relay/
 * protocol.py for the handshake, records.py for the records), all of it from OpenSSL's libcrypto.
 * No I/O here: node_helper.c moves the bytes. Every function that can fail returns -1 and leaves
 * the reason for relay_crypto_error(). */
#ifndef VPNP_RELAY_CRYPTO_H
#define VPNP_RELAY_CRYPTO_H
#include <stddef.h>
#include <stdint.h>

#define RELAY_MAGIC "VPNP-RELAY/3\n"
#define RELAY_PROTOCOL "VPNP-RELAY/"
#define RELAY_MAGIC_SIZE (sizeof RELAY_MAGIC - 1)
#define RELAY_NONCE 16
#define RELAY_PUBLIC 32
#define RELAY_MAC 32
#define RELAY_SECRET 32   /* the relay key, and each direction's traffic secret */
#define CLIENT_HELLO (RELAY_MAGIC_SIZE + RELAY_NONCE + RELAY_PUBLIC)
#define SERVER_HELLO (RELAY_MAGIC_SIZE + 1 + RELAY_NONCE + RELAY_PUBLIC + RELAY_MAC)
#define RELAY_REQUEST 23  /* verb (1) | address (16) | port (2) | worker (4) */

#define RECORD_HEADER 4   /* type (1) | plaintext length (3, big-endian) */
#define RECORD_TAG 16
#define RECORD_MAX_PLAINTEXT (64 * 1024)
#define RECORD_MAX (RECORD_HEADER + RECORD_MAX_PLAINTEXT + RECORD_TAG)
enum record_type { RECORD_DATA = 1, RECORD_END = 2 };

/* One direction of a flow: its traffic secret, its AES-128-GCM context (one for the flow's
 * life, re-keyed in place each epoch) and the number of its next record. */
struct record_direction {
    void *cipher;  /* EVP_CIPHER_CTX */
    int sealing;
    uint64_t number;
    uint8_t secret[RELAY_SECRET];
};

struct client_handshake {
    void *ephemeral;  /* EVP_PKEY, X25519 */
    uint8_t hello[CLIENT_HELLO];
};

/* Fill hs->hello (magic, nonce, public key). */
int handshake_start(struct client_handshake *hs);
/* From the server's hello (SERVER_HELLO bytes, its MAGIC and mode already checked): check its
 * proof, start both directions and write the client's proof to `proof`. The directions must
 * start zeroed; record_direction_end them whatever this returns. */
int handshake_finish(struct client_handshake *hs, const uint8_t key[RELAY_SECRET], const uint8_t *server_hello,
                     struct record_direction *sending, struct record_direction *receiving, uint8_t proof[RELAY_MAC]);
void handshake_end(struct client_handshake *hs);

void record_direction_end(struct record_direction *d);  /* frees it, forgets its secret */
/* A direction that another implementation started (the gateway's Python handshake): its
 * current traffic secret and the number of its next record. */
int record_direction_resume(struct record_direction *d, const uint8_t secret[RELAY_SECRET], uint64_t number,
                            int sealing);

/* Seal the `length` bytes of plaintext at record + RECORD_HEADER in place: writes the header
 * before them and the tag after. Returns the record's size. */
long record_seal(struct record_direction *d, uint8_t *record, size_t length, enum record_type type);
/* The size of the body after this header (ciphertext and tag), or -1 if it cannot be ours. */
long record_body_size(const uint8_t header[RECORD_HEADER]);
/* Open a whole record (header and body) in place: the plaintext's length, at record +
 * RECORD_HEADER, or -1 if it fails authentication (nothing of it may be used then). */
long record_open(struct record_direction *d, uint8_t *record);

/* Why the last call in this thread failed, one line. */
const char *relay_crypto_error(void);

#endif

/*
 * _relay_pump.so: the gateway's end of each relayed flow, pumped by the node helper's own code
 * (flow_pump.c). The gateway's relay is Python (handshake, policy, status); once a flow is set
 * up it calls one of these through ctypes, which lets go of the GIL, from the flow's thread.
 * A Python pump per 64 KiB record costs the gateway about as much CPU as the whole rest of the
 * chain; this one costs what the node helper's does (docs/benchmarks.md).
 */
#define _GNU_SOURCE
#include <stdio.h>

#include "flow_pump.h"
#include "relay_crypto.h"

/* A sealed flow: `app` is the destination's socket, `link` the node's. The two directions go
 * on from where the Python handshake left them (its current secrets and record numbers).
 * 0 when no record was at fault, else -1 with the reason in `why`. */
int vpnp_pump_sealed(int app, int link, const uint8_t send_secret[RELAY_SECRET], uint64_t send_number,
                     const uint8_t receive_secret[RELAY_SECRET], uint64_t receive_number, int paced,
                     uint64_t moved[2], char *why, size_t why_size)
{
    struct record_direction sending = {0}, receiving = {0};
    const char *fault;
    if (record_direction_resume(&sending, send_secret, send_number, 1) < 0
        || record_direction_resume(&receiving, receive_secret, receive_number, 0) < 0) {
        fault = relay_crypto_error();
        reset_close(app);
        reset_close(link);
    } else {
        fault = pump_sealed(app, link, &sending, &receiving, paced, moved);
    }
    record_direction_end(&sending);
    record_direction_end(&receiving);
    if (fault)
        snprintf(why, why_size, "%s", fault);
    return fault ? -1 : 0;
}

/* A plain flow (the gateway's opt-out): spliced both ways, moved[0] from `a` to `b`. */
void vpnp_pump_plain(int a, int b, int paced, uint64_t moved[2])
{
    pump_plain(a, b, paced, moved);
}

/*
 * What a preloaded program (relay_preload.c) says to the node helper's preload listener
 * (node_helper.c, role 'A'), in the fallback where user namespaces are off: one request, one
 * status byte back, then the flow's bytes. Both ends build from this header.
 *
 *   program -> helper   verb (1): 'C' connect to the address, 'D' a DNS-over-TCP stream to the
 *                       gateway's resolver (address and port ignored); address (16, IPv4 as
 *                       ::ffff:a.b.c.d); port (2, network order)
 *   helper -> program   status (1): the relay's (relay/protocol.py: Status), or PRELOAD_NO_RELAY
 *
 * The helper serves only connections whose other end belongs to its own user (sock_diag).
 */
#ifndef VPNP_PRELOAD_REQUEST_H
#define VPNP_PRELOAD_REQUEST_H

#define PRELOAD_REQUEST 19
#define PRELOAD_PORTS_ENV "VPNP_RELAY_PORTS"  /* "PORT4[,PORT6]": the listeners on 127.0.0.1, [::1] */

enum preload_status {
    PRELOAD_OK = 0,          /* relay/protocol.py Status: OK, REFUSED, UNREACHABLE, TIMED_OUT, FORBIDDEN */
    PRELOAD_REFUSED = 1,
    PRELOAD_UNREACHABLE = 2,
    PRELOAD_TIMED_OUT = 3,
    PRELOAD_FORBIDDEN = 4,
    PRELOAD_NO_RELAY = 5,    /* the helper could not reach any gateway's relay */
};

#endif

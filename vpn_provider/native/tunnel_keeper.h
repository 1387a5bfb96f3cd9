/* The worker's tunnel keeper (tunnel_keeper.c), a thread of the node's helper. */
#ifndef VPNP_TUNNEL_KEEPER_H
#define VPNP_TUNNEL_KEEPER_H
#include <stddef.h>

/* How the helper process ends (exec learns why on the control socket, never from these): */
enum helper_exit {
    HELPER_ENDED = 0,      /* exec closed the control socket without handing anything over */
    HELPER_FAILED = 1,     /* the first tunnel did not come up, or serving stopped */
    HELPER_BAD_SETUP = 2,  /* a set-up message exec should never have sent */
};

/* Start keeping the tunnel described by exec's "T" message, with its descriptors (tun, log,
 * the worker's user, net and mount namespaces). Replies go to `ctl`. 0, or -1 if malformed. */
int keeper_start(const char *msg, size_t len, const int *fds, int nfds, int ctl);

/* Provided by node_helper.c: the keeper moved to the ticket's gateway number `index` (in the
 * order exec gave both), so the relay's new flows go there too. */
void gateway_in_use(int index);

/* Provided by node_helper.c: connect `fd` to `to` within `timeout_ms`; 0, or -1 with errno. */
struct sockaddr_in;
int connect_with_timeout(int fd, const struct sockaddr_in *to, int timeout_ms);

/* Provided by node_helper.c: give the set-up's memory back (free heap, code run once). */
void give_back_memory(void);

/* Between ms and 1.5 ms, at random: retries of many workers must not come in step. */
long jittered(long ms);

#endif

/* A relayed flow's two pumps, the same code at both ends of the relay: in the node helper
 * (node_helper.c) and, loaded by the gateway's Python relay through ctypes, in _relay_pump.so
 * (relay_pump.c). Each pumps one flow until both directions end, in the calling thread, and
 * consumes both sockets: closed cleanly if both directions ended cleanly, else with a reset.
 * `moved` (or NULL) counts the application's bytes delivered each way, atomically: another
 * thread may read it while the flow runs (the gateway's status). */
#ifndef VPNP_FLOW_PUMP_H
#define VPNP_FLOW_PUMP_H
#include <stdint.h>

#include "relay_crypto.h"

/* A flow whose link died must end, with a reset to the application, well within a minute: the
 * link socket's TCP_USER_TIMEOUT (paced: see pace_user_timeout in flow_pump.c). */
#define LINK_USER_TIMEOUT_MS 30000

/* SO_LINGER {on, 0} (on) or the default (off): see flow_pump.c. */
void set_linger(int fd, int on);
void reset_close(int fd);
/* The peer's receive window as last advertised, or -1 if this kernel does not say. */
long peer_window(int fd);
long now_ms(void);

/* Record buffers of RECORD_MAX bytes each, whole pages from mmap (see flow_pump.c). */
size_t buffer_span(void);
uint8_t *map_buffers(int count);
void unmap_buffers(uint8_t *p, int count);

/* Splice between `a` and `b` (moved[0]: a to b, moved[1]: b to a). `paced`: the link socket
 * whose user timeout follows its peer's window, or -1. */
void pump_plain(int a, int b, int paced, uint64_t moved[2]);

/* Records both ways between the plaintext socket `app` and the `link` to the relay's other end:
 * app's bytes are sealed with `sending`, link's records opened with `receiving` (moved[0]: into
 * app, from the link; moved[1]: from app). NULL when the flow ended either way without a fault
 * in the records, else why the records from the link were wrong (the flow was reset). */
const char *pump_sealed(int app, int link, struct record_direction *sending, struct record_direction *receiving,
                        int paced, uint64_t moved[2]);

#endif

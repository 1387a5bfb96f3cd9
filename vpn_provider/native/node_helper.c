/*
 * vpnp-helper: the worker's companion on its node. It is the worker's end of the TCP relay (see
 * vpn_provider/relay/protocol.py), and its thread in tunnel_keeper.c keeps the tunnel.
 *
 * `vpn-provider exec` starts one per worker, in the node's own network namespace, and it lives
 * as long as the job. It is C so that it costs the job a small fraction of an interpreter's memory
 * (most of its own is libcrypto's tables; its code is shared; docs/benchmarks.md). Its life, driven
 * over the control socket on fd 3 (SOCK_SEQPACKET):
 *
 *   exec -> us   "IP[,IP..] PORT KEYHEX WORKER"  the gateways' relays; the key never in argv
 *   us -> exec   "OK" | "NO <reason>"        after proving the secret to the relay (a PING)
 *   exec -> us   "T" ... + 5 fds             keep the tunnel (tunnel_keeper.c; "UP" | "DOWN" back)
 *   exec -> us   "L" ROLES + a fd per role   sockets exec made inside the worker's namespace:
 *                  C  a listener for redirected TCP, on 127.0.0.1 or [::1] (each accepted
 *                     connection's SO_ORIGINAL_DST or IP6T_SO_ORIGINAL_DST is its destination)
 *                  U  UDP socket, D  TCP listener: the namespace's resolver (relay-only mode)
 *                  A  a listener on the node's own loopback for preloaded programs, where user
 *                     namespaces are off (preload_request.h): each connection names its
 *                     destination and gets the relay's status back; only our own user's are served
 *
 * Then, per connection, a thread connects to the relay, runs the handshake (relay protocol 3,
 * its cryptography in relay_crypto.c) and carries the bytes both ways: as AES-GCM records
 * (pump_sealed), or, if the gateway chose plain relaying, spliced as they are (pump_plain); both
 * pumps are in flow_pump.c. A DNS query over UDP becomes one DNS-over-TCP exchange with the
 * gateway's resolver.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/inet_diag.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>  /* OPENSSL_cleanse: glibc has explicit_bzero only from 2.25 */

#include "flow_pump.h"
#include "preload_request.h"
#include "relay_crypto.h"
#include "tunnel_keeper.h"

#define CTL_FD 3
#define PRESENCE_RETRY_MS 1000
#define CONNECT_TIMEOUT_MS 10000
#define ANSWER_TIMEOUT_S 20        /* the gateway may take 15 s to reach a destination */
#define DNS_TIMEOUT_S 5
#define THREAD_STACK (64 * 1024)   /* flow threads only move bytes (buffers: map_buffers); small
                                      stacks keep RSS flat */
#define SAY_INTERVAL 10            /* seconds between two lines on the job's stderr */

enum { STATUS_OK = 0 };

/* The relays of every gateway in the ticket, the one in use first; a flow that cannot reach the
 * one in use tries the others (its gateway died), and the rest of the job follows it there. */
#define MAX_RELAYS 64
#define FAILOVER_CONNECT_TIMEOUT_MS 3000
static struct sockaddr_in relay_addrs[MAX_RELAYS];
static uint32_t worker_id;  /* exec's pid, which CMD keeps: the gateway's status names us by it */
static int n_relays;
static atomic_int relay_in_use;
static uint8_t key[RELAY_SECRET];

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    /* stderr is the job's: a flow we could not open is reported where the user looks. At most
     * one line per SAY_INTERVAL, or a job retrying against a dead gateway floods its log. */
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static time_t next;
    static unsigned dropped;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    pthread_mutex_lock(&lock);
    if (now.tv_sec < next) {
        dropped++;
        pthread_mutex_unlock(&lock);
        return;
    }
    unsigned earlier = dropped;
    dropped = 0;
    next = now.tv_sec + SAY_INTERVAL;
    pthread_mutex_unlock(&lock);

    char line[512];
    int n = snprintf(line, sizeof line, "vpn-provider relay: ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof line - 40)
        n = (int)sizeof line - 40;
    if (earlier)
        n += snprintf(line + n, sizeof line - (size_t)n, " (%u more not shown)", earlier);
    line[n++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, (size_t)n);  /* one write: lines never interleave */
    (void)ignored;
}

/* The link to the gateway's relay: idle, keepalives find a dead peer in 15 + 3 x 5 = 30 s;
 * with data unacknowledged they stay silent and retransmissions would go on for ~15 minutes
 * (tcp_retries2), so TCP_USER_TIMEOUT ends it after 30 s without an ACK. The application's
 * socket is loopback: the gentler keepalives do there. 1 if a user timeout was set (the kernel
 * shows the peer's window, so it can be paced: flow_pump.c). */
static int tune(int fd, int link)
{
    int on = 1, idle = link ? 15 : 60, intvl = link ? 5 : 10, cnt = link ? 3 : 6;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);  /* XRootD's small requests */
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
    setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &on, sizeof on);  /* urgent data: see flow_pump.c */
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    int ms = LINK_USER_TIMEOUT_MS;
    /* Without the peer's window a paused reader cannot be told from a dead link: no user timeout
     * then, rather than abort live flows (the kernel's own limits still apply). */
    return link && peer_window(fd) >= 0 && setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms) == 0;
}

static void set_timeouts(int fd, int seconds)
{
    struct timeval tv = {seconds, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int send_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Read n bytes by `deadline` (CLOCK_MONOTONIC) in all: a peer dripping bytes cannot hold us. */
static int recv_all_by(int fd, void *buf, size_t n, const struct timespec *deadline)
{
    char *p = buf;
    while (n) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (deadline->tv_sec - now.tv_sec) * 1000 + (deadline->tv_nsec - now.tv_nsec) / 1000000;
        struct pollfd pf = {fd, POLLIN, 0};
        int r = ms > 0 ? poll(&pf, 1, (int)ms) : 0;
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = ETIMEDOUT;
            return -1;
        }
        ssize_t k = recv(fd, p, n, MSG_DONTWAIT);
        if (k < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (k <= 0) {
            if (k == 0)
                errno = ECONNRESET;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

int connect_with_timeout(int fd, const struct sockaddr_in *to, int timeout_ms)
{
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    if (connect(fd, (const struct sockaddr *)to, sizeof *to) < 0) {
        if (errno != EINPROGRESS)
            return -1;
        struct pollfd p = {fd, POLLOUT, 0};
        int r;
        while ((r = poll(&p, 1, timeout_ms)) < 0 && errno == EINTR)
            ;
        if (r < 0)
            return -1;
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            errno = err;
            return -1;
        }
    }
    fcntl(fd, F_SETFL, flags);
    return 0;
}

/* A connection to the gateway's relay after its handshake: the gateway's mode, 'S' (sealed:
 * records both ways) or 'P' (plain: the bytes as they are), and the two record directions. */
struct flow {
    int fd;
    char mode;
    struct record_direction up, down;  /* up: to the gateway; down: from it */
};

static void flow_end(struct flow *f)
{
    record_direction_end(&f->up);
    record_direction_end(&f->down);
}

static __thread char why_text[256];  /* a reason open_flow had to compose */

/* The first bytes from the relay were not our MAGIC: protocol.check_magic's words. */
static const char *not_our_magic(const uint8_t *magic)
{
    const size_t prefix = sizeof RELAY_PROTOCOL - 1;
    if (memcmp(magic, RELAY_PROTOCOL, prefix) != 0)
        return "the gateway is not a vpn-provider relay";
    char theirs[RELAY_MAGIC_SIZE] = "";
    size_t n = 0;
    for (size_t i = prefix; i < RELAY_MAGIC_SIZE; i++)
        if (magic[i] > ' ' && magic[i] < 127)  /* printable, and stripped as Python's strip() */
            theirs[n++] = (char)magic[i];
    snprintf(why_text, sizeof why_text, "the gateway speaks relay protocol %s, this side %.*s: run the same "
             "vpn-provider version on the login node and the compute nodes", theirs,
             (int)(RELAY_MAGIC_SIZE - prefix - 1), RELAY_MAGIC + prefix);
    return why_text;
}

/* A relay under load (hundreds of workers starting at once, a stranger's flood) may cut a
 * handshake it could not finish in time; before its answer nothing was done that a second try
 * could repeat harmfully (at most a destination connect, reset with the first try). */
#define HANDSHAKE_TRIES 5          /* pauses 0.2 + 0.4 + 0.8 + 1.6 s, each up to 1.5 times that */
#define DNS_HANDSHAKE_TRIES 2      /* a lookup's own resolver asks again after 2 s */
#define HANDSHAKE_RETRY_MS 200     /* then doubled each time, jittered */
#define CUT_BY_RELAY (-2)

static int open_flow_once(char verb, const uint8_t address[16], uint16_t port, struct flow *f, int *status,
                          const char **why);

/* Connect to the relay, run the handshake and ask for `verb` to `address` (16 bytes, IPv4 as
 * ::ffff:a.b.c.d) and `port`. 0 with *f set up and *status the relay's answer, or -1 with *why. */
static int open_flow(char verb, const uint8_t address[16], uint16_t port, struct flow *f, int *status, const char **why)
{
    long pause_ms = HANDSHAKE_RETRY_MS;
    const int most = verb == 'D' ? DNS_HANDSHAKE_TRIES : HANDSHAKE_TRIES;
    for (int tries = 1;; tries++) {
        int done = open_flow_once(verb, address, port, f, status, why);
        if (done != CUT_BY_RELAY)
            return done;
        if (tries == most)
            return -1;
        long ms = jittered(pause_ms);
        struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&pause, NULL);
        pause_ms *= 2;
    }
}

/* *why for a failed send or receive; whether the relay reset or closed the connection. */
static int io_failed(const char **why)
{
    *why = strerror(errno);
    return errno == ECONNRESET || errno == EPIPE;
}

/* One try of open_flow: CUT_BY_RELAY (with *why) if the relay reset or closed it mid-way. */
static int open_flow_once(char verb, const uint8_t address[16], uint16_t port, struct flow *f, int *status,
                          const char **why)
{
    memset(f, 0, sizeof *f);
    int fd = f->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *why = strerror(errno);
        return -1;
    }
    int first = atomic_load(&relay_in_use), i = first, tried = 0;
    while (connect_with_timeout(fd, &relay_addrs[i], n_relays > 1 ? FAILOVER_CONNECT_TIMEOUT_MS : CONNECT_TIMEOUT_MS) < 0) {
        *why = strerror(errno);
        close(fd);
        if (++tried == n_relays || (fd = f->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
            return -1;
        i = (i + 1) % n_relays;
    }
    if (i != first)
        gateway_in_use(i);
    set_timeouts(fd, ANSWER_TIMEOUT_S);  /* for the sends; the reads have one deadline in all */
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += ANSWER_TIMEOUT_S;
    struct client_handshake hs;
    uint8_t server_hello[SERVER_HELLO], answer[RECORD_HEADER + 1 + RECORD_TAG];
    uint8_t message[RELAY_MAC + RECORD_HEADER + RELAY_REQUEST + RECORD_TAG];  /* our proof, then the request */
    uint8_t *request = message + RELAY_MAC + RECORD_HEADER;
    int failed = 1, cut = 0;
    if (handshake_start(&hs) < 0) {
        *why = relay_crypto_error();
        goto out;
    }
    if (send_all(fd, hs.hello, CLIENT_HELLO) < 0 || recv_all_by(fd, server_hello, RELAY_MAGIC_SIZE, &deadline) < 0) {
        cut = io_failed(why);
        goto out;
    }
    if (memcmp(server_hello, RELAY_MAGIC, RELAY_MAGIC_SIZE) != 0) {
        *why = not_our_magic(server_hello);
        goto out;
    }
    if (recv_all_by(fd, server_hello + RELAY_MAGIC_SIZE, SERVER_HELLO - RELAY_MAGIC_SIZE, &deadline) < 0) {
        cut = io_failed(why);
        goto out;
    }
    f->mode = (char)server_hello[RELAY_MAGIC_SIZE];
    if (f->mode != 'S' && f->mode != 'P') {
        *why = "the gateway offered an unknown mode";
        goto out;
    }
    if (handshake_finish(&hs, key, server_hello, &f->up, &f->down, message) < 0) {
        *why = relay_crypto_error();
        goto out;
    }
    uint32_t worker = htonl(worker_id);
    request[0] = (uint8_t)verb;
    memcpy(request + 1, address, 16);
    request[17] = (uint8_t)(port >> 8);
    request[18] = (uint8_t)port;
    memcpy(request + 19, &worker, 4);
    if (record_seal(&f->up, message + RELAY_MAC, RELAY_REQUEST, RECORD_DATA) < 0) {
        *why = relay_crypto_error();
        goto out;
    }
    if (send_all(fd, message, sizeof message) < 0 || recv_all_by(fd, answer, RECORD_HEADER, &deadline) < 0) {
        cut = io_failed(why);
        goto out;
    }
    /* The answer is one DATA record of one byte; anything else is not worth reading on. */
    if (answer[0] != RECORD_DATA || record_body_size(answer) != 1 + RECORD_TAG) {
        *why = "the relay's answer: unknown status";
        goto out;
    }
    if (recv_all_by(fd, answer + RECORD_HEADER, 1 + RECORD_TAG, &deadline) < 0) {
        cut = io_failed(why);
        goto out;
    }
    if (record_open(&f->down, answer) < 0) {
        snprintf(why_text, sizeof why_text, "the relay's answer: %s", relay_crypto_error());
        *why = why_text;
        goto out;
    }
    set_timeouts(fd, 0);
    *status = answer[RECORD_HEADER];
    failed = 0;
out:
    handshake_end(&hs);
    if (failed) {
        flow_end(f);
        close(fd);
        return cut ? CUT_BY_RELAY : -1;
    }
    return 0;
}

/* IPv4 as IPv6, ::ffff:a.b.c.d, as requests carry addresses. */
static void ipv4_mapped(struct in_addr ip, uint8_t address[16])
{
    memset(address, 0, 10);
    address[10] = address[11] = 0xFF;
    memcpy(address + 12, &ip, 4);
}

/* ---- one redirected TCP connection, or one DNS-over-TCP connection ----------------- */

struct job {
    int fd;       /* the application's connection, or the UDP socket for a DNS query */
    char verb;    /* 'C' (connect to SO_ORIGINAL_DST), 'D' (the gateway's resolver), 'U',
                     'A' (a preloaded program's: its request says which of C and D) */
    struct sockaddr_in peer;  /* 'U': who asked */
    uint16_t length;
    uint8_t query[];
};

/* Where a redirected connection was going, as the request carries it: from the IPv4 listener
 * SO_ORIGINAL_DST, from the IPv6 one IP6T_SO_ORIGINAL_DST. */
static int original_destination(int fd, uint8_t address[16], uint16_t *port)
{
    struct sockaddr_in6 dest = {0};  /* room for either family */
    socklen_t len = sizeof dest;
    int family = AF_INET;
    socklen_t family_len = sizeof family;
    getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &family_len);
    /* IP6T_SO_ORIGINAL_DST has SO_ORIGINAL_DST's number, 80, at the IPv6 level. */
    if (getsockopt(fd, family == AF_INET6 ? SOL_IPV6 : SOL_IP, SO_ORIGINAL_DST, &dest, &len) < 0)
        return -1;
    if (dest.sin6_family == AF_INET6) {
        memcpy(address, &dest.sin6_addr, 16);
    } else {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&dest;
        ipv4_mapped(v4->sin_addr, address);
    }
    *port = ntohs(dest.sin6_port);  /* at the same place in both */
    return 0;
}

#define PRELOAD_REQUEST_TIMEOUT_S 5  /* the program sends it right after connecting */

/* A preloaded program's request: 'C' or 'D' into *verb, and where to. */
static int read_preload_request(int fd, char *verb, uint8_t address[16], uint16_t *port)
{
    uint8_t request[PRELOAD_REQUEST];
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += PRELOAD_REQUEST_TIMEOUT_S;
    if (recv_all_by(fd, request, sizeof request, &deadline) < 0 || (request[0] != 'C' && request[0] != 'D'))
        return -1;
    *verb = (char)request[0];
    memcpy(address, request + 1, 16);
    *port = (uint16_t)(request[17] << 8 | request[18]);
    return 0;
}

/* A flow that did not open: a preloaded program gets the status its connect() waits for, then
 * an orderly end (a reset could take the status with it); a redirected one, never told the
 * outcome, sees a reset, the nearest thing to "refused". */
static void refuse(int fd, int answers, uint8_t status)
{
    if (!answers) {
        reset_close(fd);
        return;
    }
    send_all(fd, &status, 1);
    set_linger(fd, 0);
    close(fd);
}

static void relay_tcp(struct job *j)
{
    uint8_t address[16] = {0};
    uint16_t port = 0;
    const int answers = j->verb == 'A';
    if ((j->verb == 'C' && original_destination(j->fd, address, &port) < 0)
        || (answers && read_preload_request(j->fd, &j->verb, address, &port) < 0)) {
        reset_close(j->fd);
        return;
    }
    int status = -1;
    const char *why = "";
    struct flow flow;
    if (open_flow(j->verb, address, port, &flow, &status, &why) < 0) {
        char ip[INET6_ADDRSTRLEN];
        int v4 = IN6_IS_ADDR_V4MAPPED((struct in6_addr *)address);
        if (j->verb == 'D')
            say("DNS over TCP via the relay: %s", why);
        else
            say(v4 ? "%s:%u via the relay: %s" : "[%s]:%u via the relay: %s",
                inet_ntop(v4 ? AF_INET : AF_INET6, v4 ? address + 12 : address, ip, sizeof ip), port, why);
        refuse(j->fd, answers, PRELOAD_NO_RELAY);
        return;
    }
    if (status != STATUS_OK) {
        close(flow.fd);
        flow_end(&flow);
        refuse(j->fd, answers, (uint8_t)status);
        return;
    }
    const uint8_t ok = PRELOAD_OK;
    if (answers && send_all(j->fd, &ok, 1) < 0) {
        close(flow.fd);
        flow_end(&flow);
        reset_close(j->fd);
        return;
    }
    set_linger(flow.fd, 1);  /* from here on our death resets the flow at the gateway too */
    tune(j->fd, 0);
    int paced = tune(flow.fd, 1) ? flow.fd : -1;
    why = flow.mode == 'S' ? pump_sealed(j->fd, flow.fd, &flow.up, &flow.down, paced, NULL)
                           : (pump_plain(j->fd, flow.fd, paced, NULL), NULL);
    if (why)
        say("a flow's records from the gateway: %s (the flow is reset)", why);
    flow_end(&flow);
}

/* The largest UDP answer the asker takes: 512, or what its EDNS OPT record says (RFC 6891). */
static size_t udp_limit(const uint8_t *q, size_t n, size_t *question_end)
{
    size_t at = 12, limit = 512;
    *question_end = 0;
    if (n < 12)
        return limit;
    unsigned qd = q[4] << 8 | q[5], an = q[6] << 8 | q[7], ns = q[8] << 8 | q[9], ar = q[10] << 8 | q[11];
    for (unsigned i = 0; i < qd; i++) {
        while (at < n && q[at] && (q[at] & 0xC0) != 0xC0)
            at += q[at] + 1u;
        at += (at < n && q[at]) ? 2 : 1;  /* a pointer is 2 bytes, the root label 1 */
        at += 4;                          /* type, class */
        if (at > n)
            return limit;
    }
    *question_end = at;
    /* An OPT record is a root name (0), type 41, then the payload size in the class field. */
    if (!an && !ns && ar && at + 5 <= n && q[at] == 0 && q[at + 1] == 0 && q[at + 2] == 41) {
        size_t size = (size_t)(q[at + 3] << 8 | q[at + 4]);
        if (size > limit)
            limit = size;
    }
    return limit;
}

/* Answer the asker ourselves: its header and question, no records, with `rcode` and `tc`. */
static void answer_without_records(struct job *j, size_t question_end, unsigned rcode, int tc)
{
    uint8_t reply[4096];
    if (question_end < 12 || question_end > j->length || question_end > sizeof reply)
        return;  /* a question we cannot parse gets no answer: the asker times out */
    memcpy(reply, j->query, question_end);
    reply[2] = (uint8_t)(0x80 | (reply[2] & 0x79) | (tc ? 0x02 : 0));  /* QR, keep opcode and RD */
    reply[3] = (uint8_t)(0x80 | (rcode & 0x0F));                      /* RA, rcode */
    memset(reply + 6, 0, 6);
    sendto(j->fd, reply, question_end, MSG_NOSIGNAL, (struct sockaddr *)&j->peer, sizeof j->peer);
}

enum { RCODE_SERVFAIL = 2 };

/* The query as a DNS-over-TCP message (its 2-byte length first), one record when sealed. */
static int send_query(struct flow *f, const struct job *j, uint8_t *record)
{
    uint8_t *message = record + RECORD_HEADER;
    message[0] = (uint8_t)(j->length >> 8);
    message[1] = (uint8_t)j->length;
    memcpy(message + 2, j->query, j->length);
    if (f->mode != 'S')
        return send_all(f->fd, message, 2u + j->length);
    long size = record_seal(&f->up, record, 2u + j->length, RECORD_DATA);
    return size < 0 ? -1 : send_all(f->fd, record, (size_t)size);
}

/* The gateway's answer, its 2-byte length first, into `answer` (`room` bytes, at least 2 +
 * 65535) by `deadline`: its size, or -1. */
static long receive_answer(struct flow *f, uint8_t *answer, size_t room, uint8_t *record, const struct timespec *deadline)
{
    size_t have = 0, want = 2;
    while (have < want) {
        if (f->mode != 'S') {
            if (recv_all_by(f->fd, answer + have, want - have, deadline) < 0)
                return -1;
            have = want;
        } else {
            long body, length;
            if (recv_all_by(f->fd, record, RECORD_HEADER, deadline) < 0 || (body = record_body_size(record)) < 0
                || recv_all_by(f->fd, record + RECORD_HEADER, (size_t)body, deadline) < 0
                || (length = record_open(&f->down, record)) < 0 || record[0] == RECORD_END || have + (size_t)length > room)
                return -1;
            memcpy(answer + have, record + RECORD_HEADER, (size_t)length);
            have += (size_t)length;
        }
        if (have >= 2)
            want = 2 + (size_t)(answer[0] << 8 | answer[1]);
    }
    return (long)want;
}

static void relay_udp_dns(struct job *j)
{
    size_t question_end, limit = udp_limit(j->query, j->length, &question_end);
    int status = -1;
    const char *why = "";
    const uint8_t none[16] = {0};
    struct flow flow;
    if (open_flow('D', none, 0, &flow, &status, &why) < 0 || status != STATUS_OK) {
        if (status >= 0) {
            close(flow.fd);
            flow_end(&flow);
        }
        say("DNS via the relay: %s", status < 0 ? why : "the gateway has no resolver that answers");
        /* SERVFAIL at once: the resolver library moves on instead of waiting for a time-out. */
        answer_without_records(j, question_end, RCODE_SERVFAIL, 0);
        return;
    }
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += DNS_TIMEOUT_S;
    set_timeouts(flow.fd, DNS_TIMEOUT_S);
    size_t span = buffer_span();
    uint8_t *record = map_buffers(2), *answer = record ? record + span : NULL;  /* a record, the answer */
    long size;
    if (!record || send_query(&flow, j, record) < 0 || (size = receive_answer(&flow, answer, span, record, &deadline)) < 2 + 12) {
        answer_without_records(j, question_end, RCODE_SERVFAIL, 0);
    } else if ((size_t)size - 2 > limit) {
        /* Too big for the asker's buffer: header and question only, with TC set, so it asks
         * again over TCP (our port 53 listener, a DNS stream through the relay). */
        answer_without_records(j, question_end, answer[2 + 3] & 0x0F, 1);
    } else {
        sendto(j->fd, answer + 2, (size_t)size - 2, MSG_NOSIGNAL, (struct sockaddr *)&j->peer, sizeof j->peer);
    }
    /* Our end of the exchange, authenticated: a TCP end alone reads as a cut stream there. */
    long end = record && flow.mode == 'S' ? record_seal(&flow.up, record, 0, RECORD_END) : -1;
    if (end > 0)
        send_all(flow.fd, record, (size_t)end);
    unmap_buffers(record, 2);
    close(flow.fd);
    flow_end(&flow);
}

/* Set when a job ends, and when serving starts: serve gives memory back once things are quiet
 * (give_back_memory). */
static atomic_int jobs_ended;
#define TRIM_AFTER_MS 1000

/* Our code's pages, between __executable_start and etext: never written, so the kernel can
 * drop them and read them again from the file when they are next run. */
extern const char __executable_start[], etext[];

/* A burst of handshakes, and the set-up before it, leave free heap the allocator would keep for
 * the job's life; and start-up runs much of libcrypto once (and the kernel maps code in 64 KiB
 * runs), which then stays mapped in every worker: given back, almost none of it stays resident
 * (the helper's PSS with and without this: docs/benchmarks.md). */
void give_back_memory(void)
{
    malloc_trim(0);
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)__executable_start & ~(uintptr_t)(page - 1);
    uintptr_t end = ((uintptr_t)etext + (uintptr_t)page - 1) & ~(uintptr_t)(page - 1);
    madvise((void *)start, end - start, MADV_DONTNEED);
}

static void *run_job(void *arg)
{
    struct job *j = arg;
    if (j->verb == 'U')
        relay_udp_dns(j);
    else
        relay_tcp(j);
    free(j);
    atomic_store(&jobs_ended, 1);
    return NULL;
}

static void start_job(struct job *j)
{
    pthread_attr_t attr;
    pthread_t t;
    pthread_attr_init(&attr);
    long least = sysconf(_SC_THREAD_STACK_MIN);  /* 128 KiB on some 64 KiB-page machines */
    pthread_attr_setstacksize(&attr, least > THREAD_STACK ? (size_t)least : THREAD_STACK);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, run_job, j) != 0) {
        if (j->verb != 'U')
            reset_close(j->fd);  /* no thread to be had: refuse this one, keep serving */
        free(j);
    }
    pthread_attr_destroy(&attr);
}

/* The user owning the other end of a connection accepted on the node's loopback, as the
 * kernel's socket table says (NETLINK_SOCK_DIAG, the interface of `ss`); -1 if unknown. The
 * preload listener is reachable by every user of the node: only our own may use our relay. */
static long peer_owner(int fd, const struct sockaddr_storage *peer)
{
    static int diag = -1;  /* only serve's thread asks */
    static uint32_t seq;
    struct sockaddr_storage local;
    socklen_t len = sizeof local;
    if (getsockname(fd, (struct sockaddr *)&local, &len) < 0 || local.ss_family != peer->ss_family)
        return -1;
    if (diag < 0 && (diag = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG)) >= 0)
        set_timeouts(diag, 1);
    if (diag < 0)
        return -1;
    struct { struct nlmsghdr h; struct inet_diag_req_v2 r; } req;
    memset(&req, 0, sizeof req);
    req.h.nlmsg_len = sizeof req;
    req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    req.h.nlmsg_flags = NLM_F_REQUEST;  /* one socket, looked up by its four-tuple: no dump */
    req.h.nlmsg_seq = ++seq;
    req.r.sdiag_family = (uint8_t)peer->ss_family;
    req.r.sdiag_protocol = IPPROTO_TCP;
    req.r.idiag_states = ~0U;
    req.r.id.idiag_cookie[0] = req.r.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
    /* The program's socket: its own side is our peer, its remote side is us. */
    if (peer->ss_family == AF_INET) {
        const struct sockaddr_in *p = (const void *)peer, *l = (const void *)&local;
        req.r.id.idiag_sport = p->sin_port;
        req.r.id.idiag_dport = l->sin_port;
        memcpy(req.r.id.idiag_src, &p->sin_addr, 4);
        memcpy(req.r.id.idiag_dst, &l->sin_addr, 4);
    } else {
        const struct sockaddr_in6 *p = (const void *)peer, *l = (const void *)&local;
        req.r.id.idiag_sport = p->sin6_port;
        req.r.id.idiag_dport = l->sin6_port;
        memcpy(req.r.id.idiag_src, &p->sin6_addr, 16);
        memcpy(req.r.id.idiag_dst, &l->sin6_addr, 16);
    }
    if (send(diag, &req, sizeof req, 0) < 0)
        return -1;
    for (int reads = 0; reads < 4; reads++) {  /* a late answer to an earlier question is skipped */
        union { struct nlmsghdr h; char bytes[2048]; } answer;
        ssize_t n = recv(diag, &answer, sizeof answer, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        for (struct nlmsghdr *h = &answer.h; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != seq)
                continue;
            if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY || h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg)))
                return -1;  /* NLMSG_ERROR: no such socket (it closed already), or no sock_diag */
            return (long)((struct inet_diag_msg *)NLMSG_DATA(h))->idiag_uid;
        }
    }
    return -1;
}

static void accept_one(int listener, char verb)
{
    struct sockaddr_storage peer;
    socklen_t peer_len = sizeof peer;
    int fd = accept4(listener, (struct sockaddr *)&peer, &peer_len, SOCK_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        static long next_line;  /* only serve's thread accepts */
        if ((err == EMFILE || err == ENFILE) && now_ms() >= next_line) {
            /* The connection waits in the backlog; say why, but not 20 times a second. */
            struct rlimit files = {0, 0};
            getrlimit(RLIMIT_NOFILE, &files);
            say("new connections wait: %s (at most %llu open files here)", strerror(err),
                (unsigned long long)files.rlim_cur);
            next_line = now_ms() + SAY_INTERVAL * 1000L;
        }
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM)
            usleep(50 * 1000);  /* breathe, go on */
        return;
    }
    if (verb == 'A') {
        long owner = peer_owner(fd, &peer);
        if (owner != (long)getuid()) {  /* refused in this thread: a stranger's flood costs no thread */
            const char *why = owner < 0 ? strerror(errno) : "";
            reset_close(fd);
            if (owner >= 0)
                say("refused a connection to the preload listener from user %ld", owner);
            else
                say("refused a connection to the preload listener: its owner is unknown (sock_diag: %s)", why);
            return;
        }
    }
    set_linger(fd, 1);  /* if we die from here on, the application sees a reset, never an end */
    struct job *j = calloc(1, sizeof *j);
    if (!j) {
        reset_close(fd);
        return;
    }
    j->fd = fd;
    j->verb = verb;
    start_job(j);
}

static void read_query(int udp)
{
    uint8_t buf[4096];
    struct sockaddr_in peer;
    socklen_t len = sizeof peer;
    ssize_t n = recvfrom(udp, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&peer, &len);
    if (n < 12)
        return;
    struct job *j = calloc(1, sizeof *j + (size_t)n);
    if (!j)
        return;
    j->fd = udp;
    j->verb = 'U';
    j->peer = peer;
    j->length = (uint16_t)n;
    memcpy(j->query, buf, (size_t)n);
    start_job(j);
}

/* `n` sockets from exec, `roles[i]` saying what p[i] is (see the top of this file). */
static void serve(struct pollfd *p, const char *roles, int n)
{
    /* A connection reset between poll and accept would otherwise block accept, and with it
     * every other flow's start and every DNS query, until the next connection comes. */
    for (int i = 0; i < n; i++)
        fcntl(p[i].fd, F_SETFL, fcntl(p[i].fd, F_GETFL) | O_NONBLOCK);
    atomic_store(&jobs_ended, 1);  /* the set-up's memory too */
    for (;;) {
        int r = poll(p, (nfds_t)n, atomic_load(&jobs_ended) ? TRIM_AFTER_MS : -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        if (r == 0 && atomic_exchange(&jobs_ended, 0))
            give_back_memory();
        for (int i = 0; i < n; i++) {
            if (!p[i].revents)
                continue;
            if (roles[i] == 'U')
                read_query(p[i].fd);
            else
                accept_one(p[i].fd, roles[i]);  /* 'C', 'D' or 'A' */
        }
    }
}

/* ---- set-up over the control socket -------------------------------------------------- */

void gateway_in_use(int index)
{
    if (index >= 0 && index < n_relays)
        atomic_store(&relay_in_use, index);
}

/* "IP[,IP...] PORT KEYHEX WORKER": the gateways' relays (every one on PORT), the one to use
 * first, and the number that names this worker at the gateway. */
static int parse_setup(char *msg)
{
    char hosts[MAX_RELAYS * 16 + 1], hex[2 * RELAY_SECRET + 1] = "";
    unsigned port, worker;
    int rc = -1;
    if (sscanf(msg, "%1024s %u %64s %u", hosts, &port, hex, &worker) != 4 || port == 0 || port > 65535
        || strlen(hex) != 2 * RELAY_SECRET)
        goto out;
    worker_id = worker;
    n_relays = 0;
    for (char *save = NULL, *host = strtok_r(hosts, ",", &save); host; host = strtok_r(NULL, ",", &save)) {
        if (n_relays == MAX_RELAYS || inet_pton(AF_INET, host, &relay_addrs[n_relays].sin_addr) != 1)
            goto out;
        relay_addrs[n_relays].sin_family = AF_INET;
        relay_addrs[n_relays++].sin_port = htons((uint16_t)port);
    }
    if (!n_relays)
        goto out;
    for (int i = 0; i < RELAY_SECRET; i++) {
        unsigned byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1)
            goto out;
        key[i] = (uint8_t)byte;
    }
    rc = 0;
out:
    OPENSSL_cleanse(hex, sizeof hex);
    return rc;
}

/* One line to exec on `ctl`. */
static void report(int ctl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(int ctl, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    send(ctl, line, n < (int)sizeof line ? (size_t)n : sizeof line - 1, MSG_NOSIGNAL);
}

/* A relay status by its name in relay/protocol.py's Status, as Python's side says it. */
static const char *status_name(int status)
{
    static const char *names[] = {"OK", "REFUSED", "UNREACHABLE", "TIMED_OUT", "FORBIDDEN"};
    return status >= 0 && status < (int)(sizeof names / sizeof *names) ? names[status] : "unknown";
}

/* The relay's check, in its own thread so the tunnel's set-up never waits for it. It answers
 * on its own copy of the control socket: main may close its own (exec moved on without the
 * relay) and the number be reused by then. */
static void *check_relay(void *ctl_copy)
{
    int ctl = (int)(intptr_t)ctl_copy;
    int status = -1;
    const char *why = "";
    const uint8_t none[16] = {0};
    struct flow probe;
    int failed = open_flow('P', none, 0, &probe, &status, &why);
    struct sockaddr_in relay = relay_addrs[atomic_load(&relay_in_use)];  /* the one that answered */
    char where[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &relay.sin_addr, where, sizeof where);
    if (failed) {
        report(ctl, "NO relay %s:%u: %s", where, ntohs(relay.sin_port), why);
    } else {
        close(probe.fd);
        flow_end(&probe);
        if (status != STATUS_OK)
            report(ctl, "NO relay %s:%u: status %s", where, ntohs(relay.sin_port), status_name(status));
        else
            report(ctl, "OK");
    }
    close(ctl);
    return NULL;
}

/* One idle connection to the relay for as long as the job runs, so the gateway's status lists
 * this worker even when no flow is open; it comes back whenever the relay does. */
static void *stay_present(void *unused)
{
    (void)unused;
    for (;;) {
        int status = -1;
        const char *why = "";
        const uint8_t none[16] = {0};
        struct flow f;
        if (open_flow('W', none, 0, &f, &status, &why) == 0) {
            flow_end(&f);  /* nothing is said on it: its end is all we wait for */
            if (status == STATUS_OK) {
                tune(f.fd, 1);  /* keepalives: a gateway that vanished is noticed */
                char byte;
                ssize_t n;
                do  /* the relay sends nothing (an END at most); this returns when it ends */
                    n = recv(f.fd, &byte, 1, 0);
                while (n > 0 || (n < 0 && errno == EINTR));
            }
            close(f.fd);
        }
        long ms = jittered(PRESENCE_RETRY_MS);  /* after a gateway restart, not all workers at once */
        struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&pause, NULL);
    }
    return NULL;
}

#define MAX_PASSED_FDS 8

/* One message from exec, with any descriptors it carries; the message length, or <= 0. */
static ssize_t receive(char *buf, size_t size, int *fds, int *nfds)
{
    union { char buf[CMSG_SPACE(MAX_PASSED_FDS * sizeof(int))]; struct cmsghdr align; } control;
    struct iovec iov = {buf, size};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                       .msg_controllen = sizeof control.buf};
    ssize_t n;
    while ((n = recvmsg(CTL_FD, &m, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR)
        ;
    *nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); n > 0 && c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        memcpy(fds, CMSG_DATA(c), (size_t)(count < MAX_PASSED_FDS ? count : MAX_PASSED_FDS) * sizeof(int));
        *nfds = count < MAX_PASSED_FDS ? count : MAX_PASSED_FDS;
    }
    return n;
}

int main(void)
{
    prctl(PR_SET_NAME, "vpnp-helper");
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);  /* a crash must not write the key to disk */
    /* One malloc arena: flow threads allocate only in their handshake (libcrypto), and an arena
     * per thread would keep a burst's memory for the job's whole life. */
    mallopt(M_ARENA_MAX, 1);
    /* Terminal signals are CMD's business (exec put us in our own process group); SIGTTOU
     * would stop us at the first line written to a terminal CMD owns. */
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGTTOU, SIG_IGN);
    signal(SIGTTIN, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_DFL);  /* inherited SIG_IGN would reap the keeper's children behind its back */
    /* Every flow costs about six descriptors: a soft limit of 1024 would stop us near 170. */
    struct rlimit files;
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
        files.rlim_cur = files.rlim_max;
        setrlimit(RLIMIT_NOFILE, &files);
    }

    /* Set-up: messages from exec until it hands over the namespace's sockets ("L") or closes
     * the control socket. "T...": keep the tunnel; otherwise "IP[,IP..] PORT KEYHEX WORKER":
     * the relay. */
    static char msg[65536];
    int fds[MAX_PASSED_FDS], nfds, keeping = 0, n_served = 0;
    struct pollfd served[MAX_PASSED_FDS];
    char roles[MAX_PASSED_FDS];
    ssize_t n;
    while ((n = receive(msg, sizeof msg - 1, fds, &nfds)) > 0) {
        msg[n] = 0;
        if (msg[0] == 'T' && n > 1 && msg[1] == 0) {
            if (keeper_start(msg, (size_t)n, fds, nfds, CTL_FD) < 0) {
                report(CTL_FD, "DOWN bad tunnel set-up message from exec");
                return HELPER_BAD_SETUP;
            }
            keeping = 1;
        } else if (msg[0] == 'L') {
            for (int i = 0; i < nfds; i++) {
                if (i + 1 < n && msg[i + 1] && strchr("CUDA", msg[i + 1])) {
                    served[n_served] = (struct pollfd){fds[i], POLLIN, 0};
                    roles[n_served++] = msg[i + 1];
                } else {
                    close(fds[i]);  /* a role we do not know: nothing of ours */
                }
            }
            break;
        } else {
            int rc = parse_setup(msg), ctl = fcntl(CTL_FD, F_DUPFD_CLOEXEC, 0);
            pthread_t t;
            if (rc < 0 || ctl < 0) {
                report(CTL_FD, "NO bad set-up message from exec");
            } else if (pthread_create(&t, NULL, check_relay, (void *)(intptr_t)ctl) == 0) {
                pthread_detach(t);
            } else {
                report(CTL_FD, "NO no thread for the relay's check");
                close(ctl);
            }
        }
        OPENSSL_cleanse(msg, (size_t)n);  /* both set-up messages carry a secret */
    }
    /* Each message was wiped after use: wiping all 64 KiB would only make them resident. */
    close(CTL_FD);
    if (n_served) {
        pthread_t t;
        if (pthread_create(&t, NULL, stay_present, NULL) == 0)
            pthread_detach(t);
        serve(served, roles, n_served);
        say("stopped serving: %s", strerror(errno));  /* only poll's failure ends serve */
        return HELPER_FAILED;
    }
    if (keeping)
        pthread_exit(NULL);  /* the keeper's thread goes on; the process lives while it does */
    return HELPER_ENDED;  /* exec closed the control socket without handing us anything: it gave up, and says why */
}

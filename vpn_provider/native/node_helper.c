/*
 * vpnp-helper: the worker's companion on its node. It is the worker's end of the TCP relay (see
 * vpn_provider/relay/protocol.py), and its thread in tunnel_keeper.c keeps the tunnel.
 *
 * `vpn-provider exec` starts one per worker, in the node's own network namespace, and it lives
 * as long as the job. It is C so that it costs the job about 1 MB of memory, not the 11 MB of
 * an interpreter. Its life, driven over the control socket on fd 3 (SOCK_SEQPACKET):
 *
 *   exec -> us   "IP[,IP..] PORT KEYHEX WORKER"  the gateways' relays; the key never in argv
 *   us -> exec   "OK" | "NO <reason>"        after proving the secret to the relay (a PING)
 *   exec -> us   "T" ... + 5 fds             keep the tunnel (tunnel_keeper.c; "UP" | "DOWN" back)
 *   exec -> us   "L" + up to 3 fds           sockets exec made inside the worker's namespace:
 *                  [0] listener for redirected TCP (its SO_ORIGINAL_DST is the destination)
 *                  [1] UDP socket, [2] TCP listener: the namespace's resolver (relay-only mode)
 *
 * Then, per connection, a thread connects to the relay, runs the handshake, and splices bytes
 * both ways. A DNS query over UDP becomes one DNS-over-TCP exchange with the gateway's resolver.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/netfilter_ipv4.h>
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
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "sha256.h"
#include "tunnel_keeper.h"

#define CTL_FD 3
#define MAGIC "VPNP-RELAY/2\n"     /* see vpn_provider/relay/protocol.py */
#define NONCE 16
#define REQUEST 11                 /* verb (1) | IPv4 (4) | port (2) | worker (4) */
#define PRESENCE_RETRY_MS 1000
#define CHUNK (256 * 1024)         /* per pipe; see vpn_provider/relay/pump.py on the quota */
#define CONNECT_TIMEOUT_MS 10000
#define ANSWER_TIMEOUT_S 20        /* the gateway may take 15 s to reach a destination */
#define DNS_TIMEOUT_S 5
#define THREAD_STACK (64 * 1024)   /* flow threads only splice; small stacks keep RSS flat */
#define SAY_INTERVAL 10            /* seconds between two lines on the job's stderr */
#define OOB_CHUNK 4096

enum { STATUS_OK = 0 };

/* The relays of every gateway in the ticket, the one in use first; a flow that cannot reach the
 * one in use tries the others (its gateway died), and the rest of the job follows it there. */
#define MAX_RELAYS 64
#define FAILOVER_CONNECT_TIMEOUT_MS 3000
static struct sockaddr_in relay_addrs[MAX_RELAYS];
static uint32_t worker_id;  /* exec's pid, which CMD keeps: the gateway's status names us by it */
static int n_relays;
static atomic_int relay_in_use;
static uint8_t key[SHA256_SIZE];

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

/* SO_LINGER {on, 0}: every close, the kernel's when we die included, sends a reset. A relayed
 * flow's two sockets carry it for the flow's whole life (from accept, from the relay's answer),
 * so SIGKILL, or the SIGTERM of our parent's death, resets every flow instead of ending it with
 * a FIN that reads as a clean end of stream. Only a flow that ended cleanly both ways clears it
 * (pump), so what is still queued gets delivered. */
static void set_linger(int fd, int on)
{
    struct linger l = {on, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

static void reset_close(int fd)
{
    set_linger(fd, 1);  /* close with RST: the peer must see a failure, not an end */
    close(fd);
}

/* The link to the gateway's relay: a flow whose link died must end, with a reset to the
 * application, well within a minute. Idle, keepalives find a dead peer in 15 + 3 x 5 = 30 s;
 * with data unacknowledged they stay silent and retransmissions would go on for ~15 minutes
 * (tcp_retries2), so TCP_USER_TIMEOUT ends it after 30 s without an ACK (paced: see
 * pace_user_timeout). The application's socket is loopback: the gentler keepalives do there. */
#define LINK_USER_TIMEOUT_MS 30000
#define WATCH_MS 5000              /* how often a link with data on its way is looked at */
#define TCP_INFO_SND_WND 228       /* offset of tcpi_snd_wnd in struct tcp_info (Linux >= 5.4) */

/* The peer's receive window as last advertised, or -1 if this kernel does not say. */
static long peer_window(int fd)
{
    uint8_t info[TCP_INFO_SND_WND + 4];
    socklen_t len = sizeof info;
    uint32_t wnd;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &len) < 0 || len < sizeof info)
        return -1;
    memcpy(&wnd, info + TCP_INFO_SND_WND, sizeof wnd);
    return (long)wnd;
}

/* 1 if a user timeout was set (the kernel shows the peer's window, so it can be paced). */
static int tune(int fd, int link)
{
    int on = 1, idle = link ? 15 : 60, intvl = link ? 5 : 10, cnt = link ? 3 : 6;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);  /* XRootD's small requests */
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
    setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &on, sizeof on);  /* urgent data: see step() */
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

static int recv_all(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n) {
        ssize_t k = recv(fd, p, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            if (k == 0)
                errno = ECONNRESET;
            else if (errno == EAGAIN)
                errno = ETIMEDOUT;  /* SO_RCVTIMEO ran out */
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

/* Connect to the relay and ask for `verb` to `dest` (network byte order). Returns the socket,
 * with *status set, or -1 with *why set. */
static int open_flow(char verb, struct in_addr dest_ip, uint16_t dest_port, int *status, const char **why)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *why = strerror(errno);
        return -1;
    }
    int first = atomic_load(&relay_in_use), i = first, tried = 0;
    while (connect_with_timeout(fd, &relay_addrs[i], n_relays > 1 ? FAILOVER_CONNECT_TIMEOUT_MS : CONNECT_TIMEOUT_MS) < 0) {
        *why = strerror(errno);
        close(fd);
        if (++tried == n_relays || (fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
            return -1;
        i = (i + 1) % n_relays;
    }
    if (i != first)
        gateway_in_use(i);
    set_timeouts(fd, ANSWER_TIMEOUT_S);
    uint8_t hello[sizeof MAGIC - 1 + NONCE], answer[NONCE + SHA256_SIZE], mac[SHA256_SIZE];
    uint8_t signed_part[1 + 2 * NONCE + REQUEST], proof[SHA256_SIZE + REQUEST], st;
    uint8_t *cn = hello + sizeof MAGIC - 1, *sn = answer;
    memcpy(hello, MAGIC, sizeof MAGIC - 1);
    if (getrandom(cn, NONCE, 0) != NONCE) {
        *why = "no random numbers";
        goto fail;
    }
    if (send_all(fd, hello, sizeof hello) < 0 || recv_all(fd, answer, sizeof answer) < 0) {
        *why = strerror(errno);
        goto fail;
    }
    /* The server proves the secret first: HMAC(key, "S" | cn | sn). */
    signed_part[0] = 'S';
    memcpy(signed_part + 1, cn, NONCE);
    memcpy(signed_part + 1 + NONCE, sn, NONCE);
    hmac_sha256(key, sizeof key, signed_part, 1 + 2 * NONCE, mac);
    if (!digest_equal(mac, answer + NONCE, SHA256_SIZE)) {
        *why = "the relay does not know this ticket's secret (a different gateway?)";
        goto fail;
    }
    uint8_t *request = signed_part + 1 + 2 * NONCE;
    request[0] = (uint8_t)verb;
    memcpy(request + 1, &dest_ip, 4);
    memcpy(request + 5, &dest_port, 2);
    uint32_t worker = htonl(worker_id);
    memcpy(request + 7, &worker, 4);
    signed_part[0] = 'C';
    hmac_sha256(key, sizeof key, signed_part, sizeof signed_part, proof);
    memcpy(proof + SHA256_SIZE, request, REQUEST);
    if (send_all(fd, proof, sizeof proof) < 0 || recv_all(fd, &st, 1) < 0) {
        *why = strerror(errno);
        goto fail;
    }
    set_timeouts(fd, 0);
    *status = st;
    return fd;
fail:
    close(fd);
    return -1;
}

/* ---- the splice pump ---------------------------------------------------------------- */

struct direction {
    int src, dst, pipe_r, pipe_w;
    size_t pending;  /* bytes in the pipe, not yet in dst */
    int eof, shut;
};

static int pipe_for(struct direction *d)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
        return -1;
    fcntl(p[1], F_SETPIPE_SZ, CHUNK);  /* may fail once the user's pipe quota is spent: fine */
    d->pipe_r = p[0];
    d->pipe_w = p[1];
    return 0;
}

/* Move what can move without blocking; 1 if anything moved, 0 if not, -1 on a failure. */
static int step(struct direction *d)
{
    int moved = 0;
    if (!d->eof && !d->pending) {
        ssize_t n = splice(d->src, NULL, d->pipe_w, NULL, CHUNK, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        int at_mark = 0;
        if ((n == 0 || (n < 0 && errno == EAGAIN)) && ioctl(d->src, SIOCATMARK, &at_mark) == 0 && at_mark) {
            /* splice stops at TCP's urgent mark (telnet, FTP's ABOR, Java's sendUrgentData) and
             * would report "nothing" forever; recv steps over it, and SO_OOBINLINE (tune) keeps
             * the urgent byte in the stream. The pipe is empty, so the write fits. */
            char buf[OOB_CHUNK];
            n = recv(d->src, buf, sizeof buf, MSG_DONTWAIT);
            if (n > 0 && write(d->pipe_w, buf, (size_t)n) != n)
                return -1;
        }
        if (n > 0) {
            d->pending = (size_t)n;
            moved = 1;
        } else if (n == 0) {
            d->eof = moved = 1;
        } else if (errno != EAGAIN && errno != EINTR) {
            return -1;
        }
    }
    while (d->pending) {
        ssize_t n = splice(d->pipe_r, NULL, d->dst, NULL, d->pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) {
            d->pending -= (size_t)n;
            moved = 1;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            break;
        } else {
            return -1;
        }
    }
    if (d->eof && !d->pending && !d->shut) {
        /* End of stream one way becomes a half-close the other way. */
        if (shutdown(d->dst, SHUT_WR) < 0 && errno != ENOTCONN)
            return -1;
        d->shut = moved = 1;
    }
    return moved;
}

/* TCP_USER_TIMEOUT also aborts a live peer that keeps its window shut that long (the kernel
 * counts its zero-window probes as unanswered; measured on 6.18): a reader on the far side that
 * pauses for 30 s would lose its flow. So while the peer's window is 0 the user timeout is off,
 * and on again once it opens. A dead link shows the last window the peer advertised, open
 * unless the far reader had paused, and the user timeout ends the flow. */
static void pace_user_timeout(int fd, int *off)
{
    long wnd = peer_window(fd);
    if (wnd < 0 || (wnd == 0) == *off)
        return;
    int ms = wnd == 0 ? 0 : LINK_USER_TIMEOUT_MS;
    if (setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms) == 0)
        *off = wnd == 0;
}

static long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
    return (long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Pump until both directions have ended; consumes both sockets. `paced` (a or b, or -1) is the
 * link socket whose user timeout follows its peer's window. */
static void pump(int a, int b, int paced)
{
    struct direction dirs[2] = {{a, b, -1, -1, 0, 0, 0}, {b, a, -1, -1, 0, 0, 0}};
    int failed = 0, window_shut = 0;
    long next_pace = 0;
    if (pipe_for(&dirs[0]) < 0 || pipe_for(&dirs[1]) < 0) {
        failed = 1;
        goto done;
    }
    fcntl(a, F_SETFL, fcntl(a, F_GETFL) | O_NONBLOCK);
    fcntl(b, F_SETFL, fcntl(b, F_GETFL) | O_NONBLOCK);
    int hung_up[2] = {0, 0};
    while (!(dirs[0].shut && dirs[1].shut)) {
        if (paced >= 0 && now_ms() >= next_pace) {
            pace_user_timeout(paced, &window_shut);
            next_pace = now_ms() + WATCH_MS;
        }
        int moved = 0;
        for (int i = 0; i < 2; i++) {
            int r = step(&dirs[i]);
            if (r < 0) {
                failed = 1;
                goto done;
            }
            moved |= r;
        }
        if (moved)
            continue;
        struct pollfd p[2] = {{a, 0, 0}, {b, 0, 0}};
        for (int i = 0; i < 2; i++) {
            struct direction *d = &dirs[i];
            if (!d->eof && !d->pending)
                p[i].events |= POLLIN;  /* dirs[i].src is p[i].fd */
            if (d->pending)
                p[1 - i].events |= POLLOUT;
        }
        /* A socket we want nothing from still reports errors (POLLERR: the application reset
         * an idle flow), but once it has hung up it stays out: POLLHUP would wake us in a loop. */
        for (int i = 0; i < 2; i++)
            if (!p[i].events && hung_up[i])
                p[i].fd = -1;
        /* Data on its way over the link (TIOCOUTQ is SIOCOUTQ): its peer's window may shut while
         * we wait, so wake up to pace the user timeout. An idle flow sleeps. */
        int queued = 0, wait = -1;
        if (paced >= 0 && ioctl(paced, TIOCOUTQ, &queued) == 0 && queued > 0)
            wait = WATCH_MS;
        if (poll(p, 2, wait) < 0 && errno != EINTR) {
            failed = 1;
            goto done;
        }
        for (int i = 0; i < 2; i++) {
            if (p[i].revents & POLLERR) {
                failed = 1;
                goto done;
            }
            if ((p[i].revents & POLLHUP) && !p[i].events)
                hung_up[i] = 1;
        }
    }
done:
    for (int i = 0; i < 2; i++) {
        if (dirs[i].pipe_r >= 0)
            close(dirs[i].pipe_r);
        if (dirs[i].pipe_w >= 0)
            close(dirs[i].pipe_w);
    }
    if (failed) {
        reset_close(a);
        reset_close(b);
    } else {  /* both directions ended cleanly: deliver what is queued (the FINs are sent) */
        set_linger(a, 0);
        set_linger(b, 0);
        close(a);
        close(b);
    }
}

/* ---- one redirected TCP connection, or one DNS-over-TCP connection ----------------- */

struct job {
    int fd;       /* the application's connection, or the UDP socket for a DNS query */
    char verb;    /* 'C' (connect to SO_ORIGINAL_DST), 'D' (the gateway's resolver), 'U' */
    struct sockaddr_in peer;  /* 'U': who asked */
    uint16_t length;
    uint8_t query[];
};

static void relay_tcp(struct job *j)
{
    struct sockaddr_in dest = {0};
    socklen_t len = sizeof dest;
    if (j->verb == 'C' && getsockopt(j->fd, SOL_IP, SO_ORIGINAL_DST, &dest, &len) < 0) {
        reset_close(j->fd);
        return;
    }
    int status = -1;
    const char *why = "";
    int out = open_flow(j->verb, dest.sin_addr, dest.sin_port, &status, &why);
    if (out < 0) {
        char ip[INET_ADDRSTRLEN];
        if (j->verb == 'D')
            say("DNS over TCP via the relay: %s", why);
        else
            say("%s:%u via the relay: %s", inet_ntop(AF_INET, &dest.sin_addr, ip, sizeof ip),
                ntohs(dest.sin_port), why);
        reset_close(j->fd);  /* the application sees a reset, the nearest thing to "refused" */
        return;
    }
    if (status != STATUS_OK) {
        close(out);
        reset_close(j->fd);
        return;
    }
    set_linger(out, 1);  /* from here on our death resets the flow at the gateway too */
    tune(j->fd, 0);
    pump(j->fd, out, tune(out, 1) ? out : -1);
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

static void relay_udp_dns(struct job *j)
{
    size_t question_end, limit = udp_limit(j->query, j->length, &question_end);
    int status = -1;
    const char *why = "";
    struct in_addr none = {0};
    int out = open_flow('D', none, 0, &status, &why);
    if (out < 0 || status != STATUS_OK) {
        if (out >= 0)
            close(out);
        say("DNS via the relay: %s", out < 0 ? why : "the gateway has no resolver that answers");
        /* SERVFAIL at once: the resolver library moves on instead of waiting for a time-out. */
        answer_without_records(j, question_end, RCODE_SERVFAIL, 0);
        return;
    }
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += DNS_TIMEOUT_S;
    set_timeouts(out, DNS_TIMEOUT_S);
    uint8_t head[2] = {j->length >> 8, j->length & 0xFF}, *answer = NULL;
    uint16_t n;
    if (send_all(out, head, 2) < 0 || send_all(out, j->query, j->length) < 0
        || recv_all_by(out, head, 2, &deadline) < 0)
        goto failed;
    n = (uint16_t)(head[0] << 8 | head[1]);
    if (n < 12 || !(answer = malloc(n)) || recv_all_by(out, answer, n, &deadline) < 0)
        goto failed;
    if (n > limit)
        /* Too big for the asker's buffer: header and question only, with TC set, so it asks
         * again over TCP (our port 53 listener, a DNS stream through the relay). */
        answer_without_records(j, question_end, answer[3] & 0x0F, 1);
    else
        sendto(j->fd, answer, n, MSG_NOSIGNAL, (struct sockaddr *)&j->peer, sizeof j->peer);
    goto done;
failed:
    answer_without_records(j, question_end, RCODE_SERVFAIL, 0);
done:
    free(answer);
    close(out);
}

static void *run_job(void *arg)
{
    struct job *j = arg;
    if (j->verb == 'U')
        relay_udp_dns(j);
    else
        relay_tcp(j);
    free(j);
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

static void accept_one(int listener, char verb)
{
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
            usleep(50 * 1000);  /* breathe, go on */
        return;
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

static void serve(int tcp, int udp, int dns_tcp)
{
    struct pollfd p[3] = {{tcp, POLLIN, 0}, {udp, POLLIN, 0}, {dns_tcp, POLLIN, 0}};
    /* A connection reset between poll and accept would otherwise block accept, and with it
     * every other flow's start and every DNS query, until the next connection comes. */
    for (int i = 0; i < 3; i++)
        if (p[i].fd >= 0)
            fcntl(p[i].fd, F_SETFL, fcntl(p[i].fd, F_GETFL) | O_NONBLOCK);
    for (;;) {
        if (poll(p, 3, -1) < 0) {  /* negative fds are skipped by poll */
            if (errno == EINTR)
                continue;
            return;
        }
        if (p[0].revents)
            accept_one(tcp, 'C');
        if (p[1].revents)
            read_query(udp);
        if (p[2].revents)
            accept_one(dns_tcp, 'D');
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
    char hosts[MAX_RELAYS * 16 + 1], hex[2 * SHA256_SIZE + 1] = "";
    unsigned port, worker;
    int rc = -1;
    if (sscanf(msg, "%1024s %u %64s %u", hosts, &port, hex, &worker) != 4 || port == 0 || port > 65535
        || strlen(hex) != 2 * SHA256_SIZE)
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
    for (int i = 0; i < SHA256_SIZE; i++) {
        unsigned byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1)
            goto out;
        key[i] = (uint8_t)byte;
    }
    rc = 0;
out:
    explicit_bzero(hex, sizeof hex);
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

/* The relay's check, in its own thread so the tunnel's set-up never waits for it. It answers
 * on its own copy of the control socket: main may close its own (exec moved on without the
 * relay) and the number be reused by then. */
static void *check_relay(void *ctl_copy)
{
    int ctl = (int)(intptr_t)ctl_copy;
    int status = -1;
    const char *why = "";
    int probe = open_flow('P', (struct in_addr){0}, 0, &status, &why);
    struct sockaddr_in relay = relay_addrs[atomic_load(&relay_in_use)];  /* the one that answered */
    char where[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &relay.sin_addr, where, sizeof where);
    if (probe < 0) {
        report(ctl, "NO relay %s:%u: %s", where, ntohs(relay.sin_port), why);
    } else {
        close(probe);
        if (status != STATUS_OK)
            report(ctl, "NO relay %s:%u: status %d", where, ntohs(relay.sin_port), status);
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
        int fd = open_flow('W', (struct in_addr){0}, 0, &status, &why);
        if (fd >= 0) {
            if (status == STATUS_OK) {
                tune(fd, 1);  /* keepalives: a gateway that vanished is noticed */
                char byte;
                ssize_t n;
                do  /* the relay sends nothing; this returns when it ends */
                    n = recv(fd, &byte, 1, 0);
                while (n > 0 || (n < 0 && errno == EINTR));
            }
            close(fd);
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
    int fds[MAX_PASSED_FDS], nfds, keeping = 0, listeners[3] = {-1, -1, -1};
    ssize_t n;
    while ((n = receive(msg, sizeof msg - 1, fds, &nfds)) > 0) {
        msg[n] = 0;
        if (msg[0] == 'T' && n > 1 && msg[1] == 0) {
            if (keeper_start(msg, (size_t)n, fds, nfds, CTL_FD) < 0) {
                report(CTL_FD, "DOWN bad tunnel set-up message from exec");
                return 0;
            }
            keeping = 1;
        } else if (msg[0] == 'L' && n == 1) {
            memcpy(listeners, fds, (size_t)(nfds < 3 ? nfds : 3) * sizeof(int));
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
        explicit_bzero(msg, (size_t)n);  /* both set-up messages carry a secret */
    }
    explicit_bzero(msg, sizeof msg);
    close(CTL_FD);
    if (listeners[0] >= 0) {
        pthread_t t;
        if (pthread_create(&t, NULL, stay_present, NULL) == 0)
            pthread_detach(t);
        serve(listeners[0], listeners[1], listeners[2]);
    }
    else if (keeping)
        pthread_exit(NULL);  /* the keeper's thread goes on; the process lives while it does */
    return 0;  /* exec gave up on us (and says why) */
}

/*
 * _relay_preload.so: the worker's transport where user namespaces are off ("preload").
 *
 * Without a namespace of its own, a job has no redirect to catch its TCP and no resolv.conf of
 * ours. `vpn-provider exec` then preloads this library into CMD, and the environment carries it
 * into everything CMD starts. In each process:
 *   - a TCP connect() to anywhere but this node's loopback goes to the node helper's preload
 *     listener instead, which is told the destination (preload_request.h) and answers with the
 *     relay's status once the gateway has connected: connect() returns 0 or that error;
 *   - getaddrinfo() and gethostbyname*() ask the gateway's resolver, as DNS over TCP through
 *     the same helper, for names that /etc/hosts does not have; getnameinfo() gives addresses
 *     as numbers rather than wait for the node's own resolver, which may be unreachable;
 *   - getpeername() on such a socket names the destination, not the helper.
 * UDP and everything else stay on the node's own network, as in relay-only mode. Only
 * dynamically linked programs load a preload library (static ones and set-user-ID ones do
 * not): `vpn-provider check` says which of a job's usual programs will work.
 *
 * Without VPNP_RELAY_PORTS in the environment the library does nothing.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "preload_request.h"

#define EXPORT __attribute__((visibility("default")))
#define CONNECT_MS 5000      /* to the helper on this node's loopback */
#define ANSWER_MS 60000      /* the helper tries the relay up to five times, 20 s each at worst */
#define DNS_MS 5000          /* per query, as the helper's own DNS time-out */
#define MAX_ADDRESSES 32
#define TRACKED 4096         /* sockets whose destination getpeername() reports, by fd % TRACKED */

static uint16_t port4, port6;  /* the helper's listeners on 127.0.0.1 and [::1]; 0: none */

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*getpeername_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
typedef int (*getnameinfo_fn)(const struct sockaddr *, socklen_t, char *, socklen_t, char *, socklen_t, int);
typedef int (*gethostbyname2_r_fn)(const char *, int, struct hostent *, char *, size_t, struct hostent **, int *);

/* The next definition after ours (libc's), looked up on first use: another library's
 * constructor may call us before our own constructor ran. */
#define REAL(name, type) \
    static type real_##name; \
    if (!real_##name) \
        real_##name = (type)dlsym(RTLD_NEXT, #name)

__attribute__((constructor)) static void preload_init(void)
{
    const char *ports = getenv(PRELOAD_PORTS_ENV);
    unsigned a = 0, b = 0;
    if (ports && sscanf(ports, "%u,%u", &a, &b) >= 1 && a > 0 && a < 65536 && b < 65536) {
        port4 = (uint16_t)a;
        port6 = (uint16_t)b;
    }
}

/* ---- destinations ------------------------------------------------------------------------ */

/* Whether a connect() to `to` goes through the relay, and where to as a request carries it. */
static int for_the_relay(int fd, const struct sockaddr *to, socklen_t len, uint8_t address[16], uint16_t *port)
{
    int type = 0, protocol = 0;
    socklen_t size = sizeof type;
    if (!port4 || !to)
        return 0;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) < 0 || type != SOCK_STREAM)
        return 0;
    size = sizeof protocol;
    if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &size) == 0 && protocol != IPPROTO_TCP)
        return 0;  /* SCTP and the like: the relay carries TCP */
    if (to->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *v4 = (const void *)to;
        uint32_t ip = ntohl(v4->sin_addr.s_addr);
        if ((ip >> 24) == 127 || ip == INADDR_ANY)
            return 0;  /* this node */
        memset(address, 0, 10);
        address[10] = address[11] = 0xFF;
        memcpy(address + 12, &v4->sin_addr, 4);
        *port = ntohs(v4->sin_port);
        return 1;
    }
    if (to->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *v6 = (const void *)to;
        const struct in6_addr *ip = &v6->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(ip) || IN6_IS_ADDR_UNSPECIFIED(ip) || IN6_IS_ADDR_LINKLOCAL(ip)
            || (IN6_IS_ADDR_V4MAPPED(ip) && (ip->s6_addr[12] == 127 || !memcmp(ip->s6_addr + 12, "\0\0\0\0", 4))))
            return 0;  /* this node, or a link of its own */
        memcpy(address, ip, 16);
        *port = ntohs(v6->sin6_port);
        return 1;
    }
    return 0;
}

/* Where the helper listens for a socket of `family`: [::1] if it has that listener, else
 * 127.0.0.1 (as ::ffff:127.0.0.1 for an IPv6 socket). */
static socklen_t helper_address(int family, struct sockaddr_storage *at)
{
    memset(at, 0, sizeof *at);
    if (family == AF_INET) {
        struct sockaddr_in *v4 = (void *)at;
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port4);
        v4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return sizeof *v4;
    }
    struct sockaddr_in6 *v6 = (void *)at;
    v6->sin6_family = AF_INET6;
    if (port6) {
        v6->sin6_port = htons(port6);
        v6->sin6_addr = in6addr_loopback;
    } else {
        v6->sin6_port = htons(port4);
        v6->sin6_addr.s6_addr[10] = v6->sin6_addr.s6_addr[11] = 0xFF;
        v6->sin6_addr.s6_addr[12] = 127;
        v6->sin6_addr.s6_addr[15] = 1;
    }
    return sizeof *v6;
}

/* ---- the request ------------------------------------------------------------------------- */

static long ms_left(const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (deadline->tv_sec - now.tv_sec) * 1000 + (deadline->tv_nsec - now.tv_nsec) / 1000000;
}

static void deadline_in(struct timespec *deadline, long ms)
{
    clock_gettime(CLOCK_MONOTONIC, deadline);
    deadline->tv_sec += ms / 1000;
    deadline->tv_nsec += (ms % 1000) * 1000000L;
    if (deadline->tv_nsec >= 1000000000L) {
        deadline->tv_sec++;
        deadline->tv_nsec -= 1000000000L;
    }
}

/* Wait for `events` on fd by the deadline; a signal does not end the wait: connect() has one
 * outcome, and a caller told EINTR would not know it. 0, or -1 with errno ETIMEDOUT. */
static int wait_for(int fd, short events, const struct timespec *deadline)
{
    for (;;) {
        long ms = ms_left(deadline);
        struct pollfd p = {fd, events, 0};
        int r = ms > 0 ? poll(&p, 1, (int)ms) : 0;
        if (r > 0)
            return 0;
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (errno != EINTR)
            return -1;
    }
}

/* Send (`sending`) or receive n bytes by the deadline, waiting when the socket is not ready: the
 * caller's socket may be non-blocking. 0, or -1 with errno (ECONNRESET: the helper closed). */
static int transfer_by(int fd, void *buf, size_t n, int sending, const struct timespec *deadline)
{
    char *p = buf;
    while (n) {
        ssize_t k = sending ? send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT) : recv(fd, p, n, MSG_DONTWAIT);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
        } else if (k < 0 && errno == EINTR) {
            continue;
        } else if (k < 0 && errno == EAGAIN) {
            if (wait_for(fd, sending ? POLLOUT : POLLIN, deadline) < 0)
                return -1;
        } else {
            if (k == 0)
                errno = ECONNRESET;  /* the helper is gone */
            return -1;
        }
    }
    return 0;
}

static int errno_of(uint8_t status)
{
    switch (status) {
    case PRELOAD_REFUSED: return ECONNREFUSED;
    case PRELOAD_UNREACHABLE: return EHOSTUNREACH;
    case PRELOAD_TIMED_OUT: return ETIMEDOUT;
    case PRELOAD_FORBIDDEN: return EACCES;
    default: return ENETUNREACH;  /* PRELOAD_NO_RELAY, or a status this version does not know */
    }
}

/* Connect fd to the helper and ask for `verb` to address:port; 0 once the relay answered OK,
 * else -1 with errno. The socket's own flags (O_NONBLOCK) are kept, and so are its options. */
static int relayed(connect_fn real_connect, int fd, int family, char verb, const uint8_t address[16], uint16_t port)
{
    struct sockaddr_storage helper;
    socklen_t helper_len = helper_address(family, &helper);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -1;
    struct timespec deadline;
    deadline_in(&deadline, CONNECT_MS);
    int rc = real_connect(fd, (struct sockaddr *)&helper, helper_len), saved;
    if (rc < 0 && errno == EINPROGRESS && wait_for(fd, POLLOUT, &deadline) == 0) {
        int err = 0;
        socklen_t size = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &size);
        rc = err ? -1 : 0;
        errno = err;
    }
    if (rc == 0) {
        uint8_t request[PRELOAD_REQUEST], status = PRELOAD_NO_RELAY;
        request[0] = (uint8_t)verb;
        memcpy(request + 1, address, 16);
        request[17] = (uint8_t)(port >> 8);
        request[18] = (uint8_t)port;
        deadline_in(&deadline, ANSWER_MS);
        if (transfer_by(fd, request, sizeof request, 1, &deadline) < 0 || transfer_by(fd, &status, 1, 0, &deadline) < 0) {
            if (errno == ECONNRESET)
                errno = ENETUNREACH;
            rc = -1;
        } else if (status != PRELOAD_OK) {
            errno = errno_of(status);
            rc = -1;
        }
    }
    saved = errno;
    fcntl(fd, F_SETFL, flags);
    errno = saved;
    return rc;
}

/* ---- getpeername() ------------------------------------------------------------------------ */

static struct { int fd; socklen_t len; struct sockaddr_in6 to; } tracked[TRACKED];  /* room for either family */
static pthread_mutex_t tracked_lock = PTHREAD_MUTEX_INITIALIZER;

static void track(int fd, const struct sockaddr *to, socklen_t len)
{
    if (fd < 0 || len > (socklen_t)sizeof tracked[0].to)
        return;
    pthread_mutex_lock(&tracked_lock);
    tracked[fd % TRACKED].fd = fd + 1;  /* 0: empty */
    tracked[fd % TRACKED].len = len;
    memcpy(&tracked[fd % TRACKED].to, to, len);
    pthread_mutex_unlock(&tracked_lock);
}

EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    REAL(getpeername, getpeername_fn);
    struct sockaddr_storage peer, helper;
    socklen_t peer_len = sizeof peer;
    _Static_assert(sizeof tracked[0].to <= sizeof peer, "a tracked destination fits a sockaddr_storage");
    if (!port4 || !addr || !len || fd < 0 || real_getpeername(fd, (struct sockaddr *)&peer, &peer_len) < 0)
        return real_getpeername(fd, addr, len);
    socklen_t helper_len = helper_address(peer.ss_family, &helper);
    /* The same port on a loopback address is the helper: the socket is one of ours, unless the
     * slot now holds a later socket with this number (then the helper's address is the truth). */
    int ours = peer_len == helper_len && ((peer.ss_family == AF_INET && ((struct sockaddr_in *)&peer)->sin_port
                                           == ((struct sockaddr_in *)&helper)->sin_port)
                                          || (peer.ss_family == AF_INET6 && ((struct sockaddr_in6 *)&peer)->sin6_port
                                              == ((struct sockaddr_in6 *)&helper)->sin6_port));
    pthread_mutex_lock(&tracked_lock);
    if (ours && tracked[fd % TRACKED].fd == fd + 1) {
        peer_len = tracked[fd % TRACKED].len;
        memcpy(&peer, &tracked[fd % TRACKED].to, peer_len);
    }
    pthread_mutex_unlock(&tracked_lock);
    memcpy(addr, &peer, peer_len < *len ? peer_len : *len);
    *len = peer_len;
    return 0;
}

EXPORT int connect(int fd, const struct sockaddr *to, socklen_t len)
{
    REAL(connect, connect_fn);
    uint8_t address[16];
    uint16_t port;
    if (!for_the_relay(fd, to, len, address, &port))
        return real_connect(fd, to, len);
    if (relayed(real_connect, fd, to->sa_family, 'C', address, port) < 0)
        return -1;
    track(fd, to, len);
    return 0;
}

/* ---- names ---------------------------------------------------------------------------------- */

/* Whether /etc/hosts names `name`: then libc answers it as it would without us. */
static int in_hosts_file(const char *name)
{
    FILE *f = fopen("/etc/hosts", "re");
    char line[1024];
    int found = 0;
    if (!f)
        return 0;
    while (!found && fgets(line, sizeof line, f)) {
        char *save = NULL, *word = strtok_r(line, " \t\r\n", &save);  /* the address */
        if (!word || word[0] == '#')
            continue;
        while (!found && (word = strtok_r(NULL, " \t\r\n", &save)) && word[0] != '#')
            found = strcasecmp(word, name) == 0;
    }
    fclose(f);
    return found;
}

static int numeric(const char *name)
{
    struct in6_addr any;
    return inet_pton(AF_INET, name, &any) == 1 || inet_pton(AF_INET6, name, &any) == 1;
}

/* Names the gateway's resolver answers for us: not numbers, not localhost, not /etc/hosts's. */
static int resolved_by_relay(const char *name)
{
    return port4 && name && *name && !numeric(name) && strcasecmp(name, "localhost") != 0
        && !in_hosts_file(name);
}

/* A DNS question for `name`, type `qtype`, recursion desired; its length, or 0 if the name is
 * not one DNS can carry. */
static size_t dns_question(const char *name, uint16_t id, uint16_t qtype, uint8_t *out, size_t room)
{
    size_t at = 12, length = strlen(name);
    if (length && name[length - 1] == '.')
        length--;  /* already absolute */
    if (length == 0 || length > 253 || room < 12 + length + 2 + 4)
        return 0;
    memset(out, 0, 12);
    out[0] = (uint8_t)(id >> 8);
    out[1] = (uint8_t)id;
    out[2] = 0x01;  /* RD */
    out[5] = 1;     /* one question */
    for (size_t start = 0; start < length;) {
        const char *dot = memchr(name + start, '.', length - start);
        size_t label = (dot ? (size_t)(dot - name) : length) - start;
        if (label == 0 || label > 63)
            return 0;
        out[at++] = (uint8_t)label;
        memcpy(out + at, name + start, label);
        at += label;
        start += label + 1;
    }
    out[at++] = 0;
    out[at++] = (uint8_t)(qtype >> 8);
    out[at++] = (uint8_t)qtype;
    out[at++] = 0;
    out[at++] = 1;  /* class IN */
    return at;
}

/* Past the name at `at` (labels, or a compression pointer): the offset after it, or 0. */
static size_t skip_name(const uint8_t *m, size_t n, size_t at)
{
    while (at < n) {
        uint8_t length = m[at];
        if (length == 0)
            return at + 1;
        if ((length & 0xC0) == 0xC0)
            return at + 2 <= n ? at + 2 : 0;
        if (length & 0xC0)
            return 0;
        at += 1u + length;
    }
    return 0;
}

enum { DNS_TYPE_A = 1, DNS_TYPE_AAAA = 28, DNS_NXDOMAIN = 3 };

/* The addresses of type `qtype` in an answer to question `id`, appended to `out` (16 bytes
 * each, IPv4 as ::ffff:a.b.c.d). 0, or an EAI_ code. */
static int dns_addresses(const uint8_t *m, size_t n, uint16_t id, uint16_t qtype, uint8_t (*out)[16], int *count)
{
    if (n < 12 || (m[0] << 8 | m[1]) != id || !(m[2] & 0x80))
        return EAI_AGAIN;
    if ((m[3] & 0x0F) == DNS_NXDOMAIN)
        return EAI_NONAME;
    if (m[3] & 0x0F)
        return EAI_AGAIN;  /* SERVFAIL, REFUSED: the resolver could not say */
    unsigned questions = m[4] << 8 | m[5], answers = m[6] << 8 | m[7];
    size_t at = 12;
    for (unsigned i = 0; i < questions; i++)
        if (!(at = skip_name(m, n, at)) || (at += 4) > n)
            return EAI_AGAIN;
    for (unsigned i = 0; i < answers; i++) {
        if (!(at = skip_name(m, n, at)) || at + 10 > n)
            return EAI_AGAIN;
        uint16_t type = (uint16_t)(m[at] << 8 | m[at + 1]), class = (uint16_t)(m[at + 2] << 8 | m[at + 3]);
        size_t rdlength = (size_t)(m[at + 8] << 8 | m[at + 9]);
        at += 10;
        if (at + rdlength > n)
            return EAI_AGAIN;
        if (type == qtype && class == 1 && *count < MAX_ADDRESSES) {  /* a CNAME's target's too */
            if (type == DNS_TYPE_A && rdlength == 4) {
                memset(out[*count], 0, 10);
                out[*count][10] = out[*count][11] = 0xFF;
                memcpy(out[*count] + 12, m + at, 4);
                (*count)++;
            } else if (type == DNS_TYPE_AAAA && rdlength == 16) {
                memcpy(out[(*count)++], m + at, 16);
            }
        }
        at += rdlength;
    }
    return 0;
}

/* Ask the gateway's resolver for `name`'s addresses of each type in `qtypes` (A before AAAA:
 * IPv4 first, as relay-only mode prefers it); 0 with *count set, or an EAI_ code. */
static int relay_lookup(const char *name, const uint16_t *qtypes, int n_qtypes, uint8_t (*out)[16], int *count)
{
    REAL(connect, connect_fn);
    const uint8_t nowhere[16] = {0};
    /* The answer off the stack: a program's threads may have small ones. */
    uint8_t query[2 + 512], *answer = malloc(2 + 65535);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), result = EAI_NONAME;
    *count = 0;
    if (fd < 0 || !answer) {
        if (fd >= 0)
            close(fd);
        free(answer);
        return fd < 0 ? EAI_SYSTEM : EAI_MEMORY;
    }
    if (relayed(real_connect, fd, AF_INET, 'D', nowhere, 0) < 0) {
        close(fd);
        free(answer);
        return EAI_AGAIN;
    }
    for (int i = 0; i < n_qtypes; i++) {
        struct timespec now;  /* the stream is ours and authenticated: the id only pairs answers */
        clock_gettime(CLOCK_MONOTONIC, &now);
        uint16_t id = (uint16_t)(now.tv_nsec ^ getpid() ^ i);
        size_t length = dns_question(name, id, qtypes[i], query + 2, sizeof query - 2);
        if (!length) {
            result = EAI_NONAME;
            break;
        }
        query[0] = (uint8_t)(length >> 8);
        query[1] = (uint8_t)length;
        struct timespec deadline;
        deadline_in(&deadline, DNS_MS);
        if (transfer_by(fd, query, 2 + length, 1, &deadline) < 0 || transfer_by(fd, answer, 2, 0, &deadline) < 0
            || transfer_by(fd, answer + 2, (size_t)(answer[0] << 8 | answer[1]), 0, &deadline) < 0) {
            result = EAI_AGAIN;
            break;
        }
        int got = dns_addresses(answer + 2, (size_t)(answer[0] << 8 | answer[1]), id, qtypes[i], out, count);
        if (got == EAI_AGAIN) {
            result = got;
            break;
        }
        if (got == 0)
            result = 0;  /* the name exists; it may have addresses of the other type only */
    }
    close(fd);
    free(answer);
    if (result == 0 && *count == 0)
        result = EAI_NONAME;
    return result;
}

static int qtypes_for(int family, uint16_t qtypes[2])
{
    if (family == AF_INET) {
        qtypes[0] = DNS_TYPE_A;
        return 1;
    }
    if (family == AF_INET6) {
        qtypes[0] = DNS_TYPE_AAAA;
        return 1;
    }
    qtypes[0] = DNS_TYPE_A;
    qtypes[1] = DNS_TYPE_AAAA;
    return 2;
}

EXPORT int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    REAL(getaddrinfo, getaddrinfo_fn);
    int family = hints ? hints->ai_family : AF_UNSPEC, flags = hints ? hints->ai_flags : 0;
    if ((flags & AI_NUMERICHOST) || (family != AF_UNSPEC && family != AF_INET && family != AF_INET6)
        || !resolved_by_relay(node))
        return real_getaddrinfo(node, service, hints, res);
    uint8_t addresses[MAX_ADDRESSES][16];
    uint16_t qtypes[2];
    int count, failed = relay_lookup(node, qtypes, qtypes_for(family, qtypes), addresses, &count);
    if (failed)
        return failed;
    /* Each address made into addrinfo by libc itself (numerically), so freeaddrinfo() frees
     * what it allocated; the canonical name is the one asked for. */
    struct addrinfo numeric_hints = hints ? *hints : (struct addrinfo){0};
    numeric_hints.ai_flags = (flags | AI_NUMERICHOST) & ~(AI_CANONNAME | AI_ADDRCONFIG);
    struct addrinfo *first = NULL, **tail = &first;
    int last_error = EAI_NONAME;
    for (int i = 0; i < count; i++) {
        char text[INET6_ADDRSTRLEN];
        int v4 = IN6_IS_ADDR_V4MAPPED((struct in6_addr *)addresses[i]);
        inet_ntop(v4 ? AF_INET : AF_INET6, v4 ? addresses[i] + 12 : addresses[i], text, sizeof text);
        numeric_hints.ai_family = family == AF_UNSPEC ? (v4 ? AF_INET : AF_INET6) : family;
        struct addrinfo *part = NULL;
        if ((last_error = real_getaddrinfo(text, service, &numeric_hints, &part)) != 0)
            continue;  /* a service this socket type does not have is the same for every address */
        *tail = part;
        while (*tail)
            tail = &(*tail)->ai_next;
    }
    if (!first)
        return last_error;
    if ((flags & AI_CANONNAME) && !(first->ai_canonname = strdup(node))) {
        freeaddrinfo(first);
        return EAI_MEMORY;
    }
    *res = first;
    return 0;
}

EXPORT int getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen, char *serv,
                       socklen_t servlen, int flags)
{
    REAL(getnameinfo, getnameinfo_fn);
    if (port4 && host && !(flags & NI_NAMEREQD))
        flags |= NI_NUMERICHOST;  /* a reverse lookup would ask the node's resolver: see the top */
    return real_getnameinfo(sa, salen, host, hostlen, serv, servlen, flags);
}

/* The hostent of `name` with `count` addresses of `family`, built in the caller's buffer. */
static int fill_hostent(const char *name, int family, uint8_t (*addresses)[16], int count, struct hostent *h,
                        char *buf, size_t size, struct hostent **result, int *h_errnop)
{
    size_t length = family == AF_INET ? 4 : 16, name_size = strlen(name) + 1;
    size_t pointers = (size_t)(count + 1) * sizeof(char *) + sizeof(char *);  /* addresses, then aliases */
    size_t align = (sizeof(char *) - ((uintptr_t)buf % sizeof(char *))) % sizeof(char *);
    if (size < align + pointers + (size_t)count * length + name_size) {
        *result = NULL;
        *h_errnop = NETDB_INTERNAL;
        return ERANGE;
    }
    char **list = (char **)(void *)(buf + align), *data = buf + align + pointers;
    for (int i = 0; i < count; i++) {
        list[i] = data;
        memcpy(data, family == AF_INET ? addresses[i] + 12 : addresses[i], length);
        data += length;
    }
    list[count] = NULL;
    list[count + 1] = NULL;  /* no aliases */
    memcpy(data, name, name_size);
    h->h_name = data;
    h->h_aliases = &list[count + 1];
    h->h_addrtype = family;
    h->h_length = (int)length;
    h->h_addr_list = list;
    *result = h;
    return 0;
}

EXPORT int gethostbyname2_r(const char *name, int family, struct hostent *h, char *buf, size_t size,
                            struct hostent **result, int *h_errnop)
{
    REAL(gethostbyname2_r, gethostbyname2_r_fn);
    if ((family != AF_INET && family != AF_INET6) || !resolved_by_relay(name))
        return real_gethostbyname2_r(name, family, h, buf, size, result, h_errnop);
    uint8_t addresses[MAX_ADDRESSES][16];
    uint16_t qtype[2];
    int count, failed = relay_lookup(name, qtype, qtypes_for(family, qtype), addresses, &count);
    if (failed) {
        *result = NULL;
        *h_errnop = failed == EAI_NONAME ? HOST_NOT_FOUND : TRY_AGAIN;
        return failed == EAI_NONAME ? 0 : EAGAIN;
    }
    return fill_hostent(name, family, addresses, count, h, buf, size, result, h_errnop);
}

EXPORT int gethostbyname_r(const char *name, struct hostent *h, char *buf, size_t size, struct hostent **result,
                           int *h_errnop)
{
    return gethostbyname2_r(name, AF_INET, h, buf, size, result, h_errnop);
}

static __thread struct hostent static_host;
static __thread char static_host_buffer[sizeof(char *) * (MAX_ADDRESSES + 3) + MAX_ADDRESSES * 16 + 256];

typedef struct hostent *(*gethostbyname2_fn)(const char *, int);

EXPORT struct hostent *gethostbyname2(const char *name, int family)
{
    REAL(gethostbyname2, gethostbyname2_fn);
    if ((family != AF_INET && family != AF_INET6) || !resolved_by_relay(name))
        return real_gethostbyname2(name, family);  /* libc's buffer grows for /etc/hosts's aliases */
    struct hostent *result = NULL;
    int error = 0;
    gethostbyname2_r(name, family, &static_host, static_host_buffer, sizeof static_host_buffer, &result, &error);
    if (!result)
        h_errno = error;
    return result;
}

EXPORT struct hostent *gethostbyname(const char *name)
{
    return gethostbyname2(name, AF_INET);
}

/* The relay's two pumps, shared by both ends: see flow_pump.h. */
#define _GNU_SOURCE
#include "flow_pump.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)  /* per pipe; see vpn_provider/relay/pump.py on the quota */
#define OOB_CHUNK 4096

static void count(uint64_t *moved, ssize_t n)
{
    if (moved && n > 0)
        __atomic_fetch_add(moved, (uint64_t)n, __ATOMIC_RELAXED);
}

/* SO_LINGER {on, 0}: every close, the kernel's when we die included, sends a reset. A relayed
 * flow's two sockets carry it for the flow's whole life (from accept, from the relay's answer),
 * so SIGKILL, or the SIGTERM of our parent's death, resets every flow instead of ending it with
 * a FIN that reads as a clean end of stream. Only a flow that ended cleanly both ways clears it
 * (end_flow), so what is still queued gets delivered. */
void set_linger(int fd, int on)
{
    struct linger l = {on, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

void reset_close(int fd)
{
    set_linger(fd, 1);  /* close with RST: the peer must see a failure, not an end */
    close(fd);
}

#define WATCH_MS 5000              /* how often a link with data on its way is looked at */
#define TCP_INFO_SND_WND 228       /* offset of tcpi_snd_wnd in struct tcp_info (Linux >= 5.4) */

long peer_window(int fd)
{
    uint8_t info[TCP_INFO_SND_WND + 4];
    socklen_t len = sizeof info;
    uint32_t wnd;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &len) < 0 || len < sizeof info)
        return -1;
    memcpy(&wnd, info + TCP_INFO_SND_WND, sizeof wnd);
    return (long)wnd;
}

/* ---- the splice pump ---------------------------------------------------------------- */

struct direction {
    int src, dst, pipe_r, pipe_w;
    size_t pending;  /* bytes in the pipe, not yet in dst */
    int eof, shut;
    uint64_t *moved;  /* NULL, or where the bytes delivered to dst are counted */
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
            count(d->moved, n);
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

long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
    return (long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* What both pumps keep between their polls. */
struct watch {
    int paced;  /* the link socket whose user timeout follows its peer's window, or -1 */
    int window_shut, quiet[2];
    long next_pace;
};

static void pace(struct watch *w)
{
    if (w->paced >= 0 && now_ms() >= w->next_pace) {
        pace_user_timeout(w->paced, &w->window_shut);
        w->next_pace = now_ms() + WATCH_MS;
    }
}

/* Wait for what `p` asks, or `idle_ms` (-1: for ever). -1 if a socket failed, 0 if the time
 * passed with nothing at all to do, else 1. */
static int await_sockets(struct pollfd p[2], struct watch *w, int idle_ms)
{
    /* A socket that has hung up, or failed with bytes still to read, stays out while we want
     * nothing from it: POLLHUP and POLLERR would wake us in a loop. */
    for (int i = 0; i < 2; i++)
        if (!p[i].events && w->quiet[i])
            p[i].fd = -1;
    /* Data on its way over the link (TIOCOUTQ is SIOCOUTQ): its peer's window may shut while
     * we wait, so wake up to pace the user timeout. An idle flow sleeps. */
    int queued = 0, wait = idle_ms;
    if (w->paced >= 0 && ioctl(w->paced, TIOCOUTQ, &queued) == 0 && queued > 0)
        wait = WATCH_MS;
    int r = poll(p, 2, wait);
    if (r < 0)
        return errno == EINTR ? 1 : -1;
    for (int i = 0; i < 2; i++) {
        if (p[i].revents & POLLERR) {
            /* A peer that sent its last bytes and then a reset (the application reset an idle
             * flow, or a server aborts): the bytes it sent before are delivered, then the reset
             * (a read finds it once they are read). Nothing left to read: it failed now. */
            int unread = 0;
            if (ioctl(p[i].fd, FIONREAD, &unread) < 0 || unread == 0)
                return -1;
            w->quiet[i] = 1;
        }
        if ((p[i].revents & POLLHUP) && !p[i].events)
            w->quiet[i] = 1;
    }
    return r == 0 && !queued ? 0 : 1;
}

/* Close a flow's two sockets: with a reset if it failed, so no one takes a cut stream for a
 * whole one; else after delivering what is queued (the FINs are sent). */
static void end_flow(int a, int b, int failed)
{
    if (failed) {
        reset_close(a);
        reset_close(b);
    } else {
        set_linger(a, 0);
        set_linger(b, 0);
        close(a);
        close(b);
    }
}

void pump_plain(int a, int b, int paced, uint64_t moved[2])
{
    struct direction dirs[2] = {{a, b, -1, -1, 0, 0, 0, moved}, {b, a, -1, -1, 0, 0, 0, moved ? moved + 1 : NULL}};
    struct watch w = {paced, 0, {0, 0}, 0};
    int failed = 0;
    if (pipe_for(&dirs[0]) < 0 || pipe_for(&dirs[1]) < 0) {
        failed = 1;
        goto done;
    }
    fcntl(a, F_SETFL, fcntl(a, F_GETFL) | O_NONBLOCK);
    fcntl(b, F_SETFL, fcntl(b, F_GETFL) | O_NONBLOCK);
    while (!(dirs[0].shut && dirs[1].shut)) {
        pace(&w);
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
        if (await_sockets(p, &w, -1) < 0) {
            failed = 1;
            goto done;
        }
    }
done:
    for (int i = 0; i < 2; i++) {
        if (dirs[i].pipe_r >= 0)
            close(dirs[i].pipe_r);
        if (dirs[i].pipe_w >= 0)
            close(dirs[i].pipe_w);
    }
    end_flow(a, b, failed);
}

/* ---- the sealed pump: records both ways ---------------------------------------------- */

/* A flow's record buffers come from mmap when its bytes start and go back when it ends, and an
 * idle flow gives their pages back: a worker's memory is what its busy flows need now, never
 * what a burst once needed (the heap would keep that). Each buffer is a whole number of pages. */
#define IDLE_MS 1000

size_t buffer_span(void)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (RECORD_MAX + page - 1) / page * page;
}

uint8_t *map_buffers(int count)
{
    void *p = mmap(NULL, count * buffer_span(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void unmap_buffers(uint8_t *p, int count)
{
    if (p)
        munmap(p, count * buffer_span());
}

/* The application's bytes to the gateway: each read becomes one record, sealed in place. */
struct sealing {
    uint8_t *record;
    size_t at, left;  /* sealed bytes not yet sent */
    size_t plain;     /* the application's bytes in that record */
    int ended, shut;  /* the application's end read (END sealed) / END sent and the link shut */
    uint64_t *moved;
};

/* Records from the gateway to the application. Records are opened in place, and the
 * plaintexts of small ones gathered behind the first's, so a burst of them is one write. */
struct opening {
    uint8_t *buf;
    size_t start, end;              /* received bytes not yet opened */
    size_t plain_at, plain_left;    /* opened bytes not yet written */
    int ended, shut, link_ended;    /* END opened / the application shut / the link's TCP end */
    uint64_t *moved;
};

/* Send buf[*at, *at + *left) without blocking, as far as the socket takes it; -1 on an error. */
static int send_pending(int fd, const uint8_t *buf, size_t *at, size_t *left, int *moved)
{
    while (*left) {
        ssize_t n = send(fd, buf + *at, *left, MSG_NOSIGNAL);
        if (n < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        *at += (size_t)n;
        *left -= (size_t)n;
        *moved = 1;
    }
    return 0;
}


/* Each step moves what it can without blocking: 1 if anything moved, 0 if not, -1 if the flow
 * must be reset (with *why set if it is the gateway's records that are wrong). */
static int seal_step(struct sealing *s, struct record_direction *d, int app, int link)
{
    int moved = 0;
    if (!s->left && !s->ended) {
        /* read, not splice: it steps over an urgent mark by itself (SO_OOBINLINE keeps the byte). */
        ssize_t n = read(app, s->record + RECORD_HEADER, RECORD_MAX_PLAINTEXT);
        if (n < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        long size = record_seal(d, s->record, (size_t)n, n ? RECORD_DATA : RECORD_END);
        if (size < 0)
            return -1;
        s->at = 0;
        s->left = (size_t)size;
        s->plain = (size_t)n;
        s->ended = n == 0;
        moved = 1;
    }
    if (send_pending(link, s->record, &s->at, &s->left, &moved) < 0)
        return -1;
    if (s->left)
        return moved;
    count(s->moved, (ssize_t)s->plain);  /* the whole record is on its way */
    s->plain = 0;
    if (s->ended && !s->shut) {
        if (shutdown(link, SHUT_WR) < 0 && errno != ENOTCONN)
            return -1;
        s->shut = moved = 1;
    }
    return moved;
}

static int open_step(struct opening *o, struct record_direction *d, int link, int app, const char **why)
{
    int moved = 0;
    if (!o->plain_left && !o->link_ended) {
        if (o->start) {  /* a partial record at most: to the front, so that a whole one fits */
            memmove(o->buf, o->buf + o->start, o->end - o->start);
            o->end -= o->start;
            o->start = 0;
        }
        errno = EAGAIN;  /* a full buffer holds a whole record: open it before reading more */
        ssize_t n = o->end < RECORD_MAX ? read(link, o->buf + o->end, RECORD_MAX - o->end) : -1;
        if (n > 0) {
            o->end += (size_t)n;
            moved = 1;
        } else if (n == 0) {
            o->link_ended = moved = 1;
            if (!o->ended || o->end > o->start) {
                *why = o->ended ? "data after the end of the stream" : "the stream was cut (no end record)";
                return -1;
            }
        } else if (errno != EAGAIN && errno != EINTR) {
            return -1;
        }
    }
    if (!o->plain_left) {
        o->plain_at = o->start + RECORD_HEADER;
        while (o->end - o->start >= RECORD_HEADER) {
            uint8_t *record = o->buf + o->start, *gathered = o->buf + o->plain_at + o->plain_left;
            long body = record_body_size(record), length;
            if (o->ended) {
                *why = "data after the end of the stream";
                return -1;
            }
            if (body < 0) {
                *why = relay_crypto_error();
                return -1;
            }
            if (o->end - o->start < RECORD_HEADER + (size_t)body)
                break;  /* the rest of it is still on its way */
            if ((length = record_open(d, record)) < 0) {
                *why = relay_crypto_error();
                return -1;
            }
            /* Read the type before gathering: the plaintext moved down may cover this header. */
            o->ended = record[0] == RECORD_END;
            if (gathered != record + RECORD_HEADER)
                memmove(gathered, record + RECORD_HEADER, (size_t)length);
            o->plain_left += (size_t)length;
            o->start += RECORD_HEADER + (size_t)body;
            moved = 1;
        }
    }
    size_t before = o->plain_at;
    int rc = send_pending(app, o->buf, &o->plain_at, &o->plain_left, &moved);
    count(o->moved, (ssize_t)(o->plain_at - before));
    if (rc < 0)
        return -1;
    if (o->plain_left)
        return moved;
    if (o->ended && !o->shut) {  /* the gateway's END: the application's end of stream */
        if (shutdown(app, SHUT_WR) < 0 && errno != ENOTCONN)
            return -1;
        o->shut = moved = 1;
    }
    return moved;
}

/* Pump a sealed flow until both directions have ended; consumes both sockets. A stream is never
 * cut silently: the application's end goes on as END then the link's FIN, the gateway's END as
 * the application's FIN, and any other end of the link (a TCP end without END, a record that
 * fails, data after END) resets both sockets. */
const char *pump_sealed(int app, int link, struct record_direction *sending, struct record_direction *receiving,
                        int paced, uint64_t moved[2])
{
    size_t span = buffer_span();
    uint8_t *buffers = map_buffers(2);
    struct sealing up = {buffers, 0, 0, 0, 0, 0, moved ? moved + 1 : NULL};
    struct opening down = {buffers + span, 0, 0, 0, 0, 0, 0, 0, moved};
    struct watch w = {paced, 0, {0, 0}, 0};
    const char *why = NULL;
    int failed = !buffers, resident = 1;
    fcntl(app, F_SETFL, fcntl(app, F_GETFL) | O_NONBLOCK);
    fcntl(link, F_SETFL, fcntl(link, F_GETFL) | O_NONBLOCK);
    while (!failed && !(up.shut && down.shut)) {
        pace(&w);
        int sealed = seal_step(&up, sending, app, link);
        int opened = sealed < 0 ? 0 : open_step(&down, receiving, link, app, &why);
        if (sealed < 0 || opened < 0) {
            failed = 1;
            break;
        }
        if (sealed || opened) {
            resident = 1;
            continue;
        }
        struct pollfd p[2] = {{app, 0, 0}, {link, 0, 0}};
        if (!up.left && !up.ended)
            p[0].events |= POLLIN;
        if (down.plain_left)
            p[0].events |= POLLOUT;
        if (!down.plain_left && !down.link_ended)
            p[1].events |= POLLIN;
        if (up.left)
            p[1].events |= POLLOUT;
        int r = await_sockets(p, &w, resident ? IDLE_MS : -1);
        if (r < 0) {
            failed = 1;
        } else if (r == 0) {  /* idle: give the pages back until bytes come */
            if (!up.left)
                madvise(up.record, span, MADV_DONTNEED);
            if (!down.plain_left && down.start == down.end) {
                down.start = down.end = 0;
                madvise(down.buf, span, MADV_DONTNEED);
            }
            resident = 0;
        }
    }
    unmap_buffers(buffers, 2);
    end_flow(app, link, failed);
    return why;
}

/*
 * The worker's tunnel, kept up for the job's whole life (a thread of vpnp-helper).
 *
 * openconnect can resume a session only while the gateway remembers it; a restarted or crashed
 * gateway (ocserv) forgets every session, and openconnect then exits. So the keeper runs
 * openconnect itself, and when it exits after the tunnel was up, it:
 *   1. says so on the job's stderr (one line), and takes the namespace's tunnel down (rejoin
 *      "down": vpn0 down, so new connections fail at once; tunnel TCP flows are reset);
 *   2. probes the gateways with a TCP connect every PROBE_INTERVAL_MS, round robin, and starts a
 *      fresh openconnect (a new login with the ticket's secret) at the first that accepts;
 *   3. once openconnect reports the new tunnel, reconfigures the namespace (rejoin "up": the new
 *      address, routes, MTU, resolvers) and says so (one line).
 * If no gateway takes it back within the give-up time, it SIGTERMs CMD (our parent): a worker
 * without network should end loudly, so the batch system and the workflow see it.
 *
 * The rejoin steps run `python -I -m vpn_provider.worker.rejoin`, which enters the worker's user,
 * network and mount namespaces through the descriptors exec handed us: the namespace is
 * configured by the same Python code (pyroute2) at the start and after every reconnection.
 *
 * Set-up message from exec (SOCK_SEQPACKET, NUL-separated), with 5 descriptors:
 *   "T" give_up_s attempt_s tcp_mode python pythonpath ld_library_path secret log_is_scratch preload worker
 *       n {probe_ip port url}*n argv...   (pythonpath, ld_library_path: exec's own, "" if unset)
 *   fds: tun, openconnect's log, /proc/self/ns/{user,net,mnt} of the worker
 * Replies to exec: "UP" NUL env-blob (the first tunnel is up), or "DOWN <how it ended>".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tunnel_keeper.h"

#define MAX_GATEWAYS 64
#define MAX_ARGS 64
#define PROBE_TIMEOUT_MS 1000
#define PROBE_INTERVAL_MS 500
#define MAX_BACKOFF_MS 8000
#define REJOIN_TIMEOUT_MS 20000
#define REPORT_END "VPNP_REPORT_END=1"
#define REPORT_MAX (256 * 1024)
/* openconnect's fixed descriptors (see worker/tunnel.py: the script writes to fd 3). */
enum { OC_REPORT_FD = 3, OC_TUN_FD = 4 };
/* The rejoin tool's descriptors: the worker's namespaces (see worker/rejoin.py). */
enum { NS_USER_FD = 3, NS_NET_FD = 4, NS_MNT_FD = 5 };
enum { FD_TUN, FD_LOG, FD_USER, FD_NET, FD_MNT, KEEPER_FDS };

struct gateway {
    struct sockaddr_in probe;
    char *url;
};

static struct {
    long give_up_s, attempt_s;
    char *tcp_mode, *python, *secret;
    char *env[6];         /* openconnect's: PATH, LC_ALL, LD_PRELOAD, VPNP_TUN_FD, LD_LIBRARY_PATH */
    char *rejoin_env[5];  /* the rejoin tool's: PATH, LC_ALL, PYTHONPATH, LD_LIBRARY_PATH */
    pid_t cmd;            /* our parent, CMD: the one to end if no gateway comes back */
    int log_is_scratch;
    int n_gateways;
    struct gateway gateways[MAX_GATEWAYS];
    char *argv[MAX_ARGS + 3];  /* openconnect's argv; our name and the url go in the last slots */
    char *worker;              /* how the gateway's status names this worker */
    unsigned reconnections;
    int n_args;
    int fds[KEEPER_FDS];
    int ctl;
    char *copy;  /* the message the strings above point into */
} k;

static void announce(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void announce(const char *fmt, ...)
{
    char line[512];
    int n = snprintf(line, sizeof line, "vpn-provider: ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, (size_t)n);  /* one write: never interleaved */
    (void)ignored;
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) < 0 && errno == EINTR)
        ;
}

/* Split the NUL-separated set-up message; 0 on success. */
static int parse(const char *msg, size_t len)
{
    k.copy = malloc(len + 1);
    if (!k.copy)
        return -1;
    memcpy(k.copy, msg, len);
    k.copy[len] = 0;
    enum { FIXED = 12 };
    char *fields[FIXED + 3 * MAX_GATEWAYS + MAX_ARGS];
    int n = 0;
    for (char *p = k.copy; p < k.copy + len && n < (int)(sizeof fields / sizeof *fields); p += strlen(p) + 1)
        fields[n++] = p;
    if (n < FIXED || strcmp(fields[0], "T") != 0)
        return -1;
    k.give_up_s = atol(fields[1]);
    k.attempt_s = atol(fields[2]);
    k.tcp_mode = fields[3];
    k.python = fields[4];
    /* The rejoin tool imports what exec imported (a user site, a shared software area), and
     * both it and openconnect may need exec's library path (an environment module's). */
    static char pythonpath[8192], libpath[8192], preload[4200];
    snprintf(pythonpath, sizeof pythonpath, "PYTHONPATH=%s", fields[5]);
    snprintf(libpath, sizeof libpath, "LD_LIBRARY_PATH=%s", fields[6]);
    k.secret = fields[7];
    k.log_is_scratch = fields[8][0] == '1';
    snprintf(preload, sizeof preload, "LD_PRELOAD=%s", fields[9]);
    int e = 0, r = 0;
    k.env[e++] = k.rejoin_env[r++] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    k.env[e++] = "LC_ALL=C";  /* openconnect's log is read by exec's diagnosis, which knows English */
    k.rejoin_env[r++] = "LC_ALL=C.UTF-8";
    k.env[e++] = preload;
    k.env[e++] = "VPNP_TUN_FD=4";  /* OC_TUN_FD, for the preload shim */
    if (fields[5][0])
        k.rejoin_env[r++] = pythonpath;
    if (fields[6][0])
        k.env[e++] = k.rejoin_env[r++] = libpath;
    k.env[e] = k.rejoin_env[r] = NULL;
    k.worker = fields[10];
    k.n_gateways = atoi(fields[11]);
    if (k.attempt_s <= 0 || k.n_gateways < 1 || k.n_gateways > MAX_GATEWAYS || n < FIXED + 3 * k.n_gateways + 1)
        return -1;
    for (int i = 0; i < k.n_gateways; i++) {
        struct gateway *g = &k.gateways[i];
        char **f = fields + FIXED + 3 * i;
        long port = atol(f[1]);
        g->probe.sin_family = AF_INET;
        g->probe.sin_port = htons((uint16_t)port);
        if (port <= 0 || port > 65535 || inet_pton(AF_INET, f[0], &g->probe.sin_addr) != 1)
            return -1;
        g->url = f[2];
    }
    for (int i = FIXED + 3 * k.n_gateways; i < n && k.n_args < MAX_ARGS; i++)
        k.argv[k.n_args++] = fields[i];
    return 0;
}

/* Does anything accept a TCP connection at the gateway's address? Cheaper than an openconnect
 * login, so a worker waiting for its gateway costs next to nothing. */
static int probe(const struct gateway *g)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    int ok = connect_with_timeout(fd, &g->probe, PROBE_TIMEOUT_MS) == 0;
    close(fd);
    return ok;
}

/* In a forked child: put `from[i]` on descriptor i + first, close everything above; exit if
 * that fails (the child must never run with some other socket of ours in a slot). */
static void place_fds(const int *from, int count, int first)
{
    int lifted[8];
    for (int i = 0; i < count; i++)  /* above every target first: a source may be a target */
        if ((lifted[i] = fcntl(from[i], F_DUPFD_CLOEXEC, 64)) < 0)
            _exit(127);
    for (int i = 0; i < count; i++)
        if (dup2(lifted[i], first + i) < 0)
            _exit(127);
    if (syscall(SYS_close_range, (unsigned)(first + count), ~0U, 0) < 0)
        for (int fd = first + count; fd < 65536; fd++)  /* kernels before 5.9 */
            close(fd);
}

static void default_signals(void)
{
    struct sigaction dfl = {0};
    dfl.sa_handler = SIG_DFL;
    for (int s = 1; s < 32; s++)
        sigaction(s, &dfl, NULL);  /* ignored dispositions would survive exec */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}


/* Start openconnect towards gateway `g`; *report gets the read end of its report pipe. */
static pid_t spawn_openconnect(const struct gateway *g, int *report)
{
    int rep[2], pw[2];
    if (pipe2(rep, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(pw, O_CLOEXEC) < 0) {
        close(rep[0]);
        close(rep[1]);
        return -1;
    }
    size_t slen = strlen(k.secret);
    /* The secret fits the pipe's buffer; openconnect reads it with --passwd-on-stdin. */
    ssize_t w1 = write(pw[1], k.secret, slen), w2 = write(pw[1], "\n", 1);
    close(pw[1]);
    if (k.log_is_scratch) {  /* only the latest attempt's log matters, and it lives in memory */
        if (ftruncate(k.fds[FD_LOG], 0) == 0)
            lseek(k.fds[FD_LOG], 0, SEEK_SET);
    }
    /* The gateway's status shows this as the session's host name: which worker, and how often
     * it has come back. */
    static char name[96];
    snprintf(name, sizeof name, "--local-hostname=%s-%u", k.worker, k.reconnections);
    k.argv[k.n_args] = name;
    k.argv[k.n_args + 1] = g->url;
    k.argv[k.n_args + 2] = NULL;
    pid_t parent = getpid();
    pid_t pid = (w1 == (ssize_t)slen && w2 == 1) ? fork() : -1;
    if (pid == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != parent)
            _exit(127);  /* SIGTERM: openconnect then says BYE to the gateway */
        int fds[] = {pw[0], k.fds[FD_LOG], k.fds[FD_LOG], [OC_REPORT_FD] = rep[1], [OC_TUN_FD] = k.fds[FD_TUN]};
        place_fds(fds, sizeof fds / sizeof *fds, 0);
        default_signals();
        execve(k.argv[0], k.argv, k.env);
        _exit(127);
    }
    close(pw[0]);
    close(rep[1]);
    if (pid < 0) {
        close(rep[0]);
        return -1;
    }
    *report = rep[0];
    return pid;
}

static void stop_child(pid_t pid)
{
    kill(pid, SIGTERM);
    for (int i = 0; i < 30; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        sleep_ms(100);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

static void describe_exit(int status, char *out, size_t n)
{
    if (WIFEXITED(status))
        snprintf(out, n, "openconnect exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(out, n, "openconnect was killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(out, n, "openconnect ended");
}

/* Wait for openconnect's report of a tunnel (its script writes `env -0` on "connect").
 * Returns the report's length (in *buf, malloc'd) once up; -1 if openconnect ended first (with
 * *why set) or `timeout_s` passed (0: no limit). */
static long await_report(pid_t pid, int report, double timeout_s, char **buf, char *why, size_t why_len)
{
    size_t cap = 8192, len = 0;
    char *b = malloc(cap);
    double deadline = now_s() + timeout_s;
    int eof = 0;
    while (b) {
        if (len >= sizeof REPORT_END && memmem(b, len, REPORT_END, sizeof REPORT_END - 1)) {
            *buf = b;
            return (long)len;
        }
        int status = 0;
        if (eof || waitpid(pid, &status, WNOHANG) == pid) {
            /* EOF: openconnect closed the pipe on its way out; give it a moment, no more. */
            for (int i = 0; eof && i < 50 && waitpid(pid, &status, WNOHANG) != pid; i++)
                sleep_ms(100);
            if (eof && kill(pid, 0) == 0)
                stop_child(pid);
            describe_exit(status, why, why_len);
            break;
        }
        if (timeout_s > 0 && now_s() > deadline) {
            snprintf(why, why_len, "no tunnel within %.0f s", timeout_s);
            stop_child(pid);
            break;
        }
        struct pollfd p = {report, POLLIN, 0};
        if (poll(&p, 1, 100) <= 0)
            continue;
        if (len + 4096 > cap) {
            char *bigger = cap < REPORT_MAX ? realloc(b, cap *= 2) : NULL;
            if (!bigger) {
                snprintf(why, why_len, "openconnect's report is too long");
                stop_child(pid);
                break;
            }
            b = bigger;
        }
        ssize_t n = read(report, b + len, cap - len);
        if (n > 0)
            len += (size_t)n;
        else if (n == 0)
            eof = 1;  /* openconnect closed the pipe: it is exiting */
    }
    free(b);
    return -1;
}

/* Run the rejoin tool in the worker's namespaces; 0 when it succeeded. */
static int rejoin(const char *action, const char *report, size_t len)
{
    int in[2];
    if (pipe2(in, O_CLOEXEC) < 0)
        return -1;
    /* Its environment is ours, not the job's: exec's import path, nothing else of Python's. */
    char *argv[] = {k.python, "-s", "-m", "vpn_provider.worker.rejoin", (char *)action, k.tcp_mode, NULL};
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
            _exit(127);
        int fds[] = {in[0], STDERR_FILENO, STDERR_FILENO,
                     [NS_USER_FD] = k.fds[FD_USER], [NS_NET_FD] = k.fds[FD_NET], [NS_MNT_FD] = k.fds[FD_MNT]};
        place_fds(fds, sizeof fds / sizeof *fds, 0);
        default_signals();
        if (chdir("/") < 0)  /* -m puts the job's cwd on sys.path: a vpn_provider there must not win */
            _exit(127);
        execve(k.python, argv, k.rejoin_env);
        _exit(127);
    }
    close(in[0]);
    if (pid < 0) {
        close(in[1]);
        return -1;
    }
    signal(SIGPIPE, SIG_IGN);
    for (size_t done = 0; done < len;) {  /* a report is small: the tool reads it all first */
        ssize_t n = write(in[1], report + done, len - done);
        if (n <= 0)
            break;
        done += (size_t)n;
    }
    close(in[1]);
    int status = 0;
    for (int waited = 0; waitpid(pid, &status, WNOHANG) != pid; waited += 50) {
        if (waited > REJOIN_TIMEOUT_MS) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        sleep_ms(50);
    }
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* 0.5, 1, 2, 4, 8, 8... s: a login refused over and over must not cost the gateway a TLS
 * handshake per worker every second. */
static long backoff_ms(int failures)
{
    long ms = PROBE_INTERVAL_MS;
    for (int i = 1; i < failures && ms < MAX_BACKOFF_MS; i++)
        ms *= 2;
    return ms < MAX_BACKOFF_MS ? ms : MAX_BACKOFF_MS;
}

/* Between ms and 1.5 ms, so that the workers of a burst do not all come back in step. */
long jittered(long ms)
{
    static _Thread_local unsigned seed;
    if (!seed)
        seed = (unsigned)getpid() ^ (unsigned)(uintptr_t)&seed ^ (unsigned)(now_s() * 1e6);
    return ms + (long)(rand_r(&seed) % (unsigned)(ms / 2 + 1));
}

static const char *host_of(const struct gateway *g)
{
    return g->url + (strncmp(g->url, "https://", 8) == 0 ? 8 : 0);
}

/* The tunnel is gone: take it back, from any gateway, until the give-up time. Returns the new
 * openconnect's pid, or -1 after giving up. *current is the gateway in use. */
static pid_t take_back(int *current, const char *lost_why)
{
    double lost_at = now_s();
    k.reconnections++;  /* the sessions of this round carry the new count in their name */
    announce("tunnel to %.*s lost (%s); reconnecting%s", (int)strcspn(host_of(&k.gateways[*current]), "/"),
             host_of(&k.gateways[*current]), lost_why, k.give_up_s ? "" : " until it is back");
    if (rejoin("down", "", 0) < 0)
        announce("could not take the tunnel down in the worker's namespace (see above)");
    int next = *current, failed_logins = 0;
    for (;;) {
        if (k.give_up_s && now_s() - lost_at > (double)k.give_up_s) {
            announce("no gateway took the tunnel back within %ld s; ending the job (SIGTERM to pid %d)",
                     k.give_up_s, (int)k.cmd);
            if (getppid() == k.cmd)  /* else CMD is gone, and we are about to follow it */
                kill(k.cmd, SIGTERM);
            return -1;
        }
        struct gateway *g = &k.gateways[next];
        if (!probe(g)) {
            next = (next + 1) % k.n_gateways;
            sleep_ms(PROBE_INTERVAL_MS / k.n_gateways + 1);
            continue;
        }
        if (failed_logins)  /* a gateway that answers but does not let us in: back off */
            sleep_ms(jittered(backoff_ms(failed_logins)));
        int report = -1;
        char why[128] = "", *buf = NULL;
        pid_t pid = spawn_openconnect(g, &report);
        long len = pid > 0 ? await_report(pid, report, (double)k.attempt_s, &buf, why, sizeof why) : -1;
        if (report >= 0)
            close(report);
        if (len >= 0) {
            int ok = rejoin("up", buf, (size_t)len) == 0;
            free(buf);
            if (ok) {
                *current = next;
                gateway_in_use(next);
                announce("tunnel back via %.*s after %.1f s", (int)strcspn(host_of(g), "/"), host_of(g),
                         now_s() - lost_at);
                return pid;
            }
            announce("could not configure the worker's namespace for the new tunnel; retrying");
            stop_child(pid);
        }
        failed_logins++;
        next = (next + 1) % k.n_gateways;
    }
}

static void *keep(void *unused)
{
    (void)unused;
    int current = 0, report = -1;
    char why[128] = "", *buf = NULL;
    pid_t pid = spawn_openconnect(&k.gateways[0], &report);
    /* The first tunnel: exec waits for it, within its own time-out, and diagnoses failures. */
    long len = pid > 0 ? await_report(pid, report, 0, &buf, why, sizeof why) : -1;
    if (report >= 0)
        close(report);
    if (len < 0) {
        char msg[160];
        int n = snprintf(msg, sizeof msg, "DOWN %s", pid > 0 ? why : "cannot start openconnect");
        send(k.ctl, msg, (size_t)n, MSG_NOSIGNAL);
        _exit(HELPER_FAILED);  /* exec gives up now, and says why */
    }
    char *reply = malloc((size_t)len + 3);
    if (reply) {
        memcpy(reply, "UP", 3);  /* "UP" NUL blob */
        memcpy(reply + 3, buf, (size_t)len);
        send(k.ctl, reply, (size_t)len + 3, MSG_NOSIGNAL);
        free(reply);
    }
    close(k.ctl);
    free(buf);
    for (;;) {
        give_back_memory();  /* the tunnel is up: we only wait now */
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        describe_exit(status, why, sizeof why);
        pid = take_back(&current, why);
        if (pid < 0)
            return NULL;
    }
}

int keeper_start(const char *msg, size_t len, const int *fds, int nfds, int ctl)
{
    if (nfds != KEEPER_FDS || parse(msg, len) < 0)
        return -1;
    memcpy(k.fds, fds, sizeof k.fds);
    k.cmd = getppid();
    /* Our own copy: main closes its descriptor when exec is done, and the number may then be
     * reused by a flow's socket before we answer. */
    k.ctl = fcntl(ctl, F_DUPFD_CLOEXEC, 0);
    for (int i = 0; i < KEEPER_FDS; i++)
        fcntl(k.fds[i], F_SETFD, FD_CLOEXEC);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&t, &attr, keep, NULL);
    pthread_attr_destroy(&attr);
    return rc == 0 ? 0 : -1;
}

/*
 * LD_PRELOAD shim for openconnect on the worker side.
 *
 * openconnect, run as an ordinary user in the host's network namespace, cannot create a tun
 * device there. The worker creates one inside its own user+network namespace instead and hands
 * the fd to openconnect (env VPNP_TUN_FD). When openconnect asks the kernel for a tun device
 * (TUNSETIFF), we put that fd in place of the one it opened and report the device's name.
 * openconnect then reads and writes the tun directly: no extra copy per packet.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

typedef int (*ioctl_fn)(int, unsigned long, void *);

static int handed_fd = -1;

__attribute__((constructor)) static void vpnp_init(void)
{
    const char *text = getenv("VPNP_TUN_FD");
    if (text && *text) {
        char *end;
        long fd = strtol(text, &end, 10);
        if (*end == '\0' && fd >= 0)
            handed_fd = (int)fd;
    }
    /* openconnect's scripts and their children must not inherit the shim. */
    unsetenv("VPNP_TUN_FD");
    unsetenv("LD_PRELOAD");
}

int ioctl(int fd, unsigned long request, ...)
{
    static ioctl_fn real_ioctl;
    va_list ap;
    void *arg;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (!real_ioctl)
        real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");

    if (request == TUNSETIFF && handed_fd >= 0 && fd != handed_fd) {
        struct ifreq *ifr = arg;
        int saved = handed_fd;
        if (dup2(saved, fd) < 0)
            return -1;
        close(saved);
        handed_fd = -1;
        /* Fill in the name of the device the fd is attached to. */
        return real_ioctl(fd, TUNGETIFF, ifr);
    }
    return real_ioctl(fd, request, arg);
}

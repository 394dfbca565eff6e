/* walsvc_fault.so: an LD_PRELOAD shim that makes one libc call fail, for the calls libfiu does not wrap
 * (CPython's os.pwritev calls pwritev64v2 and os.posix_fallocate posix_fallocate64), and for fsync/fdatasync
 * when a test must pick *which* call fails (libfiu can neither skip calls nor filter by file).
 *
 * Driven by one environment variable, read once at load:
 *
 *   WALSVC_FAULT="call=pwritev,errno=EIO,after=0,path=.wal,mode=once,arm=/tmp/x/armed"
 *
 *   call   pwritev (pwritev, pwritev2 and their 64-bit forms) | fallocate (posix_fallocate, fallocate and
 *          their 64-bit forms) | fsync | fdatasync | setaffinity (sched_setaffinity: no file, so no path)
 *   errno  EIO | ENOSPC | EROFS | EDQUOT | EINVAL | a number                    (default EIO)
 *   after  matching calls that still succeed once armed, before the first failure (default 0)
 *   path   only calls on a file whose path (from /proc/self/fd) contains this   (default: any file)
 *   mode   once: fail one call, then behave | persistent: fail every later one   (default persistent)
 *   arm    the fault is armed once this file exists (checked per matching call) (default: armed at start)
 *
 * Each injected failure is reported on stderr ("walsvc_fault: ..."), so a test can prove it happened.
 * Build: gcc -shared -fPIC -O2 -o walsvc_fault.so walsvc_fault.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum call { CALL_NONE, CALL_PWRITEV, CALL_FALLOCATE, CALL_FSYNC, CALL_FDATASYNC, CALL_SETAFFINITY };

static struct {
    enum call call;
    int err;
    long after;
    int once;
    char path[256];
    char arm[512];
} cfg;

static long matched;  /* matching calls seen while armed (atomic) */
static int fired;     /* failures injected (atomic) */

static int parse_errno(const char *v) {
    if (!strcmp(v, "EIO")) return EIO;
    if (!strcmp(v, "ENOSPC")) return ENOSPC;
    if (!strcmp(v, "EROFS")) return EROFS;
    if (!strcmp(v, "EDQUOT")) return EDQUOT;
    if (!strcmp(v, "EINVAL")) return EINVAL;
    return atoi(v);
}

__attribute__((constructor)) static void load_config(void) {
    const char *spec = getenv("WALSVC_FAULT");
    cfg.err = EIO;
    if (!spec) return;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", spec);
    char *save = NULL;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');
        if (!eq) continue;
        *eq = '\0';
        const char *k = item, *v = eq + 1;
        if (!strcmp(k, "call")) {
            cfg.call = !strcmp(v, "pwritev") ? CALL_PWRITEV : !strcmp(v, "fallocate") ? CALL_FALLOCATE
                     : !strcmp(v, "fsync") ? CALL_FSYNC : !strcmp(v, "fdatasync") ? CALL_FDATASYNC
                     : !strcmp(v, "setaffinity") ? CALL_SETAFFINITY : CALL_NONE;
            if (cfg.call == CALL_NONE) fprintf(stderr, "walsvc_fault: unknown call %s\n", v);
        } else if (!strcmp(k, "errno")) cfg.err = parse_errno(v);
        else if (!strcmp(k, "after")) cfg.after = atol(v);
        else if (!strcmp(k, "mode")) cfg.once = !strcmp(v, "once");
        else if (!strcmp(k, "path")) snprintf(cfg.path, sizeof cfg.path, "%s", v);
        else if (!strcmp(k, "arm")) snprintf(cfg.arm, sizeof cfg.arm, "%s", v);
        else fprintf(stderr, "walsvc_fault: unknown key %s\n", k);
    }
}

/* Whether this call on `fd` fails now (and with what errno: returned, 0 for no). */
static int should_fail(enum call call, int fd, const char *name) {
    if (cfg.call != call) return 0;
    if (cfg.arm[0] && access(cfg.arm, F_OK) != 0) return 0;
    char link[64], path[4096] = "";
    if (fd >= 0) {
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        path[n > 0 ? n : 0] = '\0';
    }
    if (cfg.path[0] && !strstr(path, cfg.path)) return 0;
    if (__atomic_fetch_add(&matched, 1, __ATOMIC_SEQ_CST) < cfg.after) return 0;
    if (cfg.once && __atomic_fetch_add(&fired, 1, __ATOMIC_SEQ_CST) > 0) return 0;
    if (!cfg.once) __atomic_fetch_add(&fired, 1, __ATOMIC_SEQ_CST);
    fprintf(stderr, "walsvc_fault: %s on %s fails with %s\n", name, path, strerrorname_np(cfg.err));
    return cfg.err;
}

/* The next definition of `name` (libc's), looked up once; typed like the wrapper being defined. */
#define REAL(name) static __typeof__(&name) real_##name; if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

#define PWRITEV_WRAPPER(name, off_type)                                                        \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_type off) {                     \
        REAL(name);                                                                            \
        int e = should_fail(CALL_PWRITEV, fd, #name);                                          \
        if (e) { errno = e; return -1; }                                                       \
        return real_##name(fd, iov, cnt, off);                                                 \
    }
#define PWRITEV2_WRAPPER(name, off_type)                                                       \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_type off, int flags) {          \
        REAL(name);                                                                            \
        int e = should_fail(CALL_PWRITEV, fd, #name);                                          \
        if (e) { errno = e; return -1; }                                                       \
        return real_##name(fd, iov, cnt, off, flags);                                          \
    }
PWRITEV_WRAPPER(pwritev, off_t)
PWRITEV_WRAPPER(pwritev64, off64_t)
PWRITEV2_WRAPPER(pwritev2, off_t)
PWRITEV2_WRAPPER(pwritev64v2, off64_t)

#define POSIX_FALLOCATE_WRAPPER(name, off_type)                                                \
    int name(int fd, off_type off, off_type len) {                                             \
        REAL(name);                                                                            \
        int e = should_fail(CALL_FALLOCATE, fd, #name);                                        \
        if (e) return e; /* posix_fallocate returns the error, errno is untouched */           \
        return real_##name(fd, off, len);                                                      \
    }
#define FALLOCATE_WRAPPER(name, off_type)                                                      \
    int name(int fd, int mode, off_type off, off_type len) {                                   \
        REAL(name);                                                                            \
        int e = should_fail(CALL_FALLOCATE, fd, #name);                                        \
        if (e) { errno = e; return -1; }                                                       \
        return real_##name(fd, mode, off, len);                                                \
    }
POSIX_FALLOCATE_WRAPPER(posix_fallocate, off_t)
POSIX_FALLOCATE_WRAPPER(posix_fallocate64, off64_t)
FALLOCATE_WRAPPER(fallocate, off_t)
FALLOCATE_WRAPPER(fallocate64, off64_t)

#define SYNC_WRAPPER(name, which)                                                              \
    int name(int fd) {                                                                         \
        REAL(name);                                                                            \
        int e = should_fail(which, fd, #name);                                                 \
        if (e) { errno = e; return -1; }                                                       \
        return real_##name(fd);                                                                \
    }
SYNC_WRAPPER(fsync, CALL_FSYNC)
SYNC_WRAPPER(fdatasync, CALL_FDATASYNC)

int sched_setaffinity(pid_t pid, size_t size, const cpu_set_t *mask) {
    REAL(sched_setaffinity);
    int e = should_fail(CALL_SETAFFINITY, -1, "sched_setaffinity");
    if (e) { errno = e; return -1; }
    return real_sched_setaffinity(pid, size, mask);
}

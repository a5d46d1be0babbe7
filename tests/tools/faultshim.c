/* A fault injector for tests/tools/test_faults.py, loaded with LD_PRELOAD (built by the test with `cc`).
 *
 * It counts the file operations a process makes under the folder FAULT_DIR: opening a file for writing, write,
 * pwrite, writev, ftruncate, fsync, fdatasync, rename, unlink, mkdir, rmdir (and their *at forms), and
 *   FAULT_KILL_AT=N      kills the process with SIGKILL instead of doing operation N (1-based);
 *   FAULT_SPACE=BYTES    lets writes under FAULT_DIR put that many bytes in all, then fails them with ENOSPC
 *                        (the write that crosses the budget is cut short, as on a full disk);
 *   FAULT_READONLY=1     fails every operation that would change FAULT_DIR with EROFS (a read-only mount);
 *   FAULT_LOG=FILE       appends "N operation path" for each counted operation to FILE.
 * fault_configure() sets the same (and restarts the counts) in a running process: tests/tools/fault_driver.py
 * calls it in each forked child. Python's os.* and file objects and the C library's callers reach these symbols;
 * safetensors (Rust) opens and writes through them but renames its own temporary file with a raw system call,
 * which is not counted (no state of ours lies between its write and that rename).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 65536
static char tracked[MAX_FD];   /* fds opened under FAULT_DIR */
static char dir_[PATH_MAX];
static size_t dir_len;
static long kill_at, ops;
static long long space = -1, used;
static int readonly;
static const char *log_path;  /* NULL: no log */

#define REAL(name) static __typeof__(name) *real_##name; if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

static char log_[PATH_MAX];

void fault_configure(const char *dir, long kill, long long bytes, int ro, const char *log) {
    dir_len = 0;
    if (dir && *dir) {
        strncpy(dir_, dir, sizeof dir_ - 1);
        dir_len = strlen(dir_);
        while (dir_len > 1 && dir_[dir_len - 1] == '/') dir_[--dir_len] = 0;
    }
    kill_at = kill;
    space = bytes;
    readonly = ro;
    log_path = NULL;
    if (log && *log) {
        strncpy(log_, log, sizeof log_ - 1);
        log_path = log_;
    }
    ops = used = 0;
}

__attribute__((constructor)) static void init(void) {
    const char *env = getenv("FAULT_KILL_AT"), *bytes = getenv("FAULT_SPACE"), *ro = getenv("FAULT_READONLY");
    fault_configure(getenv("FAULT_DIR"), env ? atol(env) : 0, bytes ? atoll(bytes) : -1, ro ? atoi(ro) : 0,
                    getenv("FAULT_LOG"));
}

/* path (relative to dirfd) under FAULT_DIR? */
static int under(int dirfd, const char *path) {
    char full[PATH_MAX * 2];
    if (!dir_len || !path) return 0;
    if (path[0] == '/') {
        snprintf(full, sizeof full, "%s", path);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof base)) return 0;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n < 0) return 0;
            base[n] = 0;
        }
        snprintf(full, sizeof full, "%s/%s", base, path);
    }
    return strncmp(full, dir_, dir_len) == 0 && (full[dir_len] == '/' || full[dir_len] == 0);
}

static int fd_under(int fd) { return fd >= 0 && fd < MAX_FD && tracked[fd]; }

/* Count one operation; 0 to go on, -1 (errno set) to fail it. */
static int op(const char *what, const char *path, int modifies) {
    long n = __atomic_add_fetch(&ops, 1, __ATOMIC_SEQ_CST);
    if (log_path) {
        REAL(open);
        REAL(write);
        REAL(close);
        char line[PATH_MAX + 64];
        int len = snprintf(line, sizeof line, "%ld %s %s\n", n, what, path ? path : "");
        int fd = real_open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            real_write(fd, line, len);
            real_close(fd);
        }
    }
    if (kill_at && n == kill_at) kill(getpid(), SIGKILL);
    if (readonly && modifies) {
        errno = EROFS;
        return -1;
    }
    return 0;
}

static int writing(int flags) { return (flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC)) != 0; }

static int opened(int fd, int counted) {
    if (fd >= 0 && fd < MAX_FD) tracked[fd] = counted;
    return fd;
}

#define OPEN_BODY(realcall, dirfd)                                                     \
    mode_t mode = 0;                                                                   \
    if (flags & (O_CREAT | __O_TMPFILE)) {                                             \
        va_list ap;                                                                    \
        va_start(ap, flags);                                                           \
        mode = va_arg(ap, mode_t);                                                     \
        va_end(ap);                                                                    \
    }                                                                                  \
    int in = under(dirfd, path);                                                       \
    if (in && writing(flags) && op("open", path, 1)) return -1;                        \
    return opened(realcall, in);

int open(const char *path, int flags, ...) { REAL(open); OPEN_BODY(real_open(path, flags, mode), AT_FDCWD) }
int open64(const char *path, int flags, ...) { REAL(open64); OPEN_BODY(real_open64(path, flags, mode), AT_FDCWD) }
int openat(int dirfd, const char *path, int flags, ...) {
    REAL(openat);
    OPEN_BODY(real_openat(dirfd, path, flags, mode), dirfd)
}
int openat64(int dirfd, const char *path, int flags, ...) {
    REAL(openat64);
    OPEN_BODY(real_openat64(dirfd, path, flags, mode), dirfd)
}
int creat(const char *path, mode_t mode) { return open(path, O_CREAT | O_WRONLY | O_TRUNC, mode); }
int creat64(const char *path, mode_t mode) { return open64(path, O_CREAT | O_WRONLY | O_TRUNC, mode); }

int close(int fd) {
    REAL(close);
    opened(fd, 0);
    return real_close(fd);
}

/* how much of a write of n bytes the budget allows; -1 (ENOSPC) when it is spent */
static ssize_t allowed(size_t n) {
    if (space < 0) return (ssize_t)n;
    long long left = space - __atomic_load_n(&used, __ATOMIC_SEQ_CST);
    if (left <= 0) {
        errno = ENOSPC;
        return -1;
    }
    return (ssize_t)((long long)n < left ? (long long)n : left);
}

static ssize_t wrote(ssize_t n) {
    if (n > 0) __atomic_add_fetch(&used, n, __ATOMIC_SEQ_CST);
    return n;
}

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write);
    if (!fd_under(fd)) return real_write(fd, buf, n);
    if (op("write", NULL, 1)) return -1;
    ssize_t k = allowed(n);
    return k < 0 ? -1 : wrote(real_write(fd, buf, (size_t)k));
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite);
    if (!fd_under(fd)) return real_pwrite(fd, buf, n, off);
    if (op("pwrite", NULL, 1)) return -1;
    ssize_t k = allowed(n);
    return k < 0 ? -1 : wrote(real_pwrite(fd, buf, (size_t)k, off));
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) { return pwrite(fd, buf, n, off); }

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    REAL(writev);
    if (!fd_under(fd)) return real_writev(fd, iov, cnt);
    if (op("writev", NULL, 1)) return -1;
    size_t total = 0;
    for (int i = 0; i < cnt; i++) total += iov[i].iov_len;
    ssize_t k = allowed(total);
    if (k < 0) return -1;
    if ((size_t)k < total) { /* cut short: write what fits of the first buffers */
        REAL(write);
        ssize_t done = 0;
        for (int i = 0; i < cnt && done < k; i++) {
            size_t part = iov[i].iov_len < (size_t)(k - done) ? iov[i].iov_len : (size_t)(k - done);
            ssize_t w = real_write(fd, iov[i].iov_base, part);
            if (w <= 0) break;
            done += w;
        }
        return wrote(done);
    }
    return wrote(real_writev(fd, iov, cnt));
}

int ftruncate(int fd, off_t len) {
    REAL(ftruncate);
    if (fd_under(fd) && op("ftruncate", NULL, 1)) return -1;
    return real_ftruncate(fd, len);
}

int ftruncate64(int fd, off_t len) { return ftruncate(fd, len); }

int fsync(int fd) {
    REAL(fsync);
    if (fd_under(fd) && op("fsync", NULL, 0)) return -1;
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (fd_under(fd) && op("fdatasync", NULL, 0)) return -1;
    return real_fdatasync(fd);
}

int rename(const char *a, const char *b) {
    REAL(rename);
    if ((under(AT_FDCWD, a) || under(AT_FDCWD, b)) && op("rename", b, 1)) return -1;
    return real_rename(a, b);
}

int renameat(int da, const char *a, int db, const char *b) {
    REAL(renameat);
    if ((under(da, a) || under(db, b)) && op("renameat", b, 1)) return -1;
    return real_renameat(da, a, db, b);
}

int renameat2(int da, const char *a, int db, const char *b, unsigned int flags) {
    REAL(renameat2);
    if ((under(da, a) || under(db, b)) && op("renameat2", b, 1)) return -1;
    return real_renameat2(da, a, db, b, flags);
}

int unlink(const char *path) {
    REAL(unlink);
    if (under(AT_FDCWD, path) && op("unlink", path, 1)) return -1;
    return real_unlink(path);
}

int unlinkat(int dirfd, const char *path, int flags) {
    REAL(unlinkat);
    if (under(dirfd, path) && op("unlinkat", path, 1)) return -1;
    return real_unlinkat(dirfd, path, flags);
}

/* an existing folder is EEXIST even on a read-only mount */
int mkdir(const char *path, mode_t mode) {
    REAL(mkdir);
    struct stat st;
    if (under(AT_FDCWD, path) && stat(path, &st) != 0 && op("mkdir", path, 1)) return -1;
    return real_mkdir(path, mode);
}

int mkdirat(int dirfd, const char *path, mode_t mode) {
    REAL(mkdirat);
    struct stat st;
    if (under(dirfd, path) && fstatat(dirfd, path, &st, 0) != 0 && op("mkdirat", path, 1)) return -1;
    return real_mkdirat(dirfd, path, mode);
}

int rmdir(const char *path) {
    REAL(rmdir);
    if (under(AT_FDCWD, path) && op("rmdir", path, 1)) return -1;
    return real_rmdir(path);
}

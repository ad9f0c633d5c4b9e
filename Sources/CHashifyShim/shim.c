#define _GNU_SOURCE
/* The calls Swift cannot make through Glibc's overlay. A wrapper of one
 * system call returns what the call returns; EINTR is retried in one place,
 * HashifySystem's `retrying`. Only the helpers that loop over several calls
 * (copying, reading whole files) retry EINTR themselves, mid-loop. */
#include "hashify_shim.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <malloc.h>
#include <stdlib.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>
#include <linux/stat.h>
#include <linux/loop.h>
#include <sys/ioctl.h>

const uint64_t HASHIFY_ATTR_IMMUTABLE = STATX_ATTR_IMMUTABLE;
const uint64_t HASHIFY_ATTR_APPEND = STATX_ATTR_APPEND;
const int HASHIFY_RENAME_NOREPLACE = RENAME_NOREPLACE;
const int HASHIFY_RENAME_EXCHANGE = RENAME_EXCHANGE;
const int HASHIFY_AT_EMPTY_PATH = AT_EMPTY_PATH;
const int HASHIFY_AT_SYMLINK_NOFOLLOW = AT_SYMLINK_NOFOLLOW;
const int HASHIFY_O_PATH = O_PATH;
const int HASHIFY_O_NOATIME = O_NOATIME;
const int HASHIFY_O_DIRECTORY = O_DIRECTORY;
const int HASHIFY_O_NOFOLLOW = O_NOFOLLOW;
const int HASHIFY_O_TMPFILE = O_TMPFILE;
const int HASHIFY_O_CLOEXEC = O_CLOEXEC;
const int HASHIFY_O_NONBLOCK = O_NONBLOCK;
const int HASHIFY_F_RDLCK = F_RDLCK;
const int HASHIFY_F_UNLCK = F_UNLCK;
const long HASHIFY_UTIME_OMIT = UTIME_OMIT;

#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x00001000U
#endif

static void fill(const struct statx *s, hashify_stat *out) {
    out->dev = makedev(s->stx_dev_major, s->stx_dev_minor);
    out->ino = s->stx_ino;
    out->size = s->stx_size;
    out->blocks = s->stx_blocks;
    out->mnt_id = (s->stx_mask & STATX_MNT_ID) ? s->stx_mnt_id : 0;
    out->attributes = s->stx_attributes & s->stx_attributes_mask;
    out->mtime_sec = s->stx_mtime.tv_sec;
    out->mtime_nsec = s->stx_mtime.tv_nsec;
    out->ctime_sec = s->stx_ctime.tv_sec;
    out->ctime_nsec = s->stx_ctime.tv_nsec;
    out->mode = s->stx_mode;
    out->uid = s->stx_uid;
    out->gid = s->stx_gid;
    out->nlink = s->stx_nlink;
    out->rdev = makedev(s->stx_rdev_major, s->stx_rdev_minor);
}

int hashify_statx(int dirfd, const char *name, int flags, hashify_stat *out) {
    struct statx s;
    int r = statx(dirfd, name, AT_SYMLINK_NOFOLLOW | AT_STATX_SYNC_AS_STAT | flags,
                  STATX_BASIC_STATS | STATX_MNT_ID, &s);
    if (r == 0) fill(&s, out);
    return r;
}

int hashify_fstatx(int fd, hashify_stat *out) {
    return hashify_statx(fd, "", AT_EMPTY_PATH, out);
}

int hashify_openat(int dirfd, const char *name, int flags, unsigned mode) {
    return openat(dirfd, name, flags, (mode_t)mode);
}

int hashify_renameat2(int olddirfd, const char *oldname, int newdirfd, const char *newname, unsigned flags) {
    return renameat2(olddirfd, oldname, newdirfd, newname, flags);
}

int hashify_setlease(int fd, int type) {
    return fcntl(fd, F_SETLEASE, type);
}

int hashify_getlease(int fd) { return fcntl(fd, F_GETLEASE); }

struct hashify_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

long hashify_getdents64(int fd, void *buf, size_t len) {
    return syscall(SYS_getdents64, fd, buf, len);
}

size_t hashify_dirent_next(const void *buf, size_t off, const char **name, unsigned char *type, uint64_t *ino) {
    const struct hashify_dirent64 *d = (const struct hashify_dirent64 *)((const char *)buf + off);
    *name = d->d_name;
    *type = d->d_type;
    *ino = d->d_ino;
    return off + d->d_reclen;
}

int hashify_set_mtime(int fd, int64_t sec, uint32_t nsec) {
    struct timespec ts[2] = {{0, UTIME_OMIT}, {(time_t)sec, (long)nsec}};
    return futimens(fd, ts);
}

int hashify_set_mtime_at(int dirfd, const char *name, int64_t sec, uint32_t nsec) {
    struct timespec ts[2] = {{0, UTIME_OMIT}, {(time_t)sec, (long)nsec}};
    return utimensat(dirfd, name, ts, AT_SYMLINK_NOFOLLOW);
}

void hashify_coarse_now(int64_t *sec, uint32_t *nsec) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    *sec = ts.tv_sec;
    *nsec = (uint32_t)ts.tv_nsec;
}

ssize_t hashify_flistxattr(int fd, char *list, size_t size) { return flistxattr(fd, list, size); }
ssize_t hashify_fgetxattr(int fd, const char *name, void *value, size_t size) { return fgetxattr(fd, name, value, size); }
int hashify_fsetxattr(int fd, const char *name, const void *value, size_t size) { return fsetxattr(fd, name, value, size, 0); }
int hashify_fremovexattr(int fd, const char *name) { return fremovexattr(fd, name); }
ssize_t hashify_llistxattr(const char *path, char *list, size_t size) { return llistxattr(path, list, size); }
ssize_t hashify_lgetxattr(const char *path, const char *name, void *value, size_t size) { return lgetxattr(path, name, value, size); }
int hashify_lsetxattr(const char *path, const char *name, const void *value, size_t size) { return lsetxattr(path, name, value, size, 0); }

int hashify_fadvise_sequential(int fd) { return posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL); }

int hashify_copy_all(int infd, int outfd, uint64_t size) {
    uint64_t done = 0;
    while (done < size) {
        ssize_t n = copy_file_range(infd, NULL, outfd, NULL, size - done, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOSYS) break;
            return -1;
        }
        if (n == 0) return 0;
        done += (uint64_t)n;
    }
    /* Across filesystems (an overlay file into the store): read and write. */
    char buf[65536];
    while (done < size) {
        ssize_t n = read(infd, buf, sizeof buf);
        if (n < 0) { if (errno == EINTR) continue; return -1; }
        if (n == 0) break;
        ssize_t off = 0;
        while (off < n) {
            ssize_t w = write(outfd, buf + off, (size_t)(n - off));
            if (w < 0) { if (errno == EINTR) continue; return -1; }
            off += w;
        }
        done += (uint64_t)n;
    }
    return 0;
}

void hashify_ignore_lease_signals(void) {
    signal(SIGIO, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
}

uint64_t hashify_raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 1024;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    return (uint64_t)rl.rlim_cur;
}

int hashify_flock_exclusive(int fd, int nonblocking) {
    return flock(fd, LOCK_EX | (nonblocking ? LOCK_NB : 0));
}

int hashify_mknodat(int dirfd, const char *name, unsigned mode, uint64_t dev) {
    return mknodat(dirfd, name, (mode_t)mode, (dev_t)dev);
}

#include <sys/random.h>
int hashify_random(void *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = getrandom((char *)buf + done, len - done, 0);
        if (n < 0) { if (errno == EINTR) continue; return -1; }
        done += (size_t)n;
    }
    return 0;
}

void hashify_tune_malloc(void) {
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    mallopt(M_ARENA_MAX, 2);
}

#include <sys/mount.h>
#include <sys/vfs.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
const unsigned long HASHIFY_MS_RDONLY = MS_RDONLY;
const int HASHIFY_MNT_DETACH = MNT_DETACH;

int hashify_mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data) {
    return mount(source, target, fstype, flags, data);
}

int hashify_umount(const char *target, int flags) { return umount2(target, flags); }

int hashify_loop_attach(int backing_fd, char *path, size_t path_size) {
    int control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (control < 0) return -1;
    /* Another process may take the free device between the two calls: tried again. */
    for (int attempt = 0; attempt < 32; attempt++) {
        int n = ioctl(control, LOOP_CTL_GET_FREE);
        if (n < 0) break;
        snprintf(path, path_size, "/dev/loop%d", n);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            if (errno == ENOENT) continue;
            break;
        }
        struct loop_config config;
        memset(&config, 0, sizeof config);
        config.fd = (unsigned)backing_fd;
        config.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        if (ioctl(fd, LOOP_CONFIGURE, &config) == 0) {
            close(control);
            return fd;
        }
        if (errno == EINVAL || errno == ENOTTY) {
            /* Before Linux 5.8: the two older calls. */
            if (ioctl(fd, LOOP_SET_FD, backing_fd) == 0) {
                struct loop_info64 info;
                memset(&info, 0, sizeof info);
                info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
                if (ioctl(fd, LOOP_SET_STATUS64, &info) == 0) {
                    close(control);
                    return fd;
                }
                int saved = errno;
                ioctl(fd, LOOP_CLR_FD, 0);
                errno = saved;
                close(fd);
                break;
            }
        }
        int saved = errno;
        close(fd);
        errno = saved;
        if (saved != EBUSY) break;
    }
    int saved = errno;
    close(control);
    errno = saved;
    return -1;
}

int hashify_syncfs(int fd) { return syncfs(fd); }

int hashify_punch_hole(int fd, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)length);
}

uint64_t hashify_fs_type(int fd) {
    struct statfs s;
    if (fstatfs(fd, &s) != 0) return 0;
    return (uint64_t)s.f_type;
}

/* The kernel's file handle of NAME in DIRFD (not following a symlink): its
   type in *type, its bytes in out (at most *len; *len set). -1 with errno. */
int hashify_file_handle(int dirfd, const char *name, unsigned char *out, unsigned *len, int *type) {
    union { struct file_handle fh; unsigned char buf[sizeof(struct file_handle) + 128]; } h;
    int mount_id;
    h.fh.handle_bytes = 128;
    if (name_to_handle_at(dirfd, name, &h.fh, &mount_id, 0) != 0) return -1;
    if (h.fh.handle_bytes > *len) { errno = EOVERFLOW; return -1; }
    memcpy(out, h.fh.f_handle, h.fh.handle_bytes);
    *len = h.fh.handle_bytes;
    *type = h.fh.handle_type;
    return 0;
}

#include <linux/btrfs.h>
int hashify_btrfs_fsid(int fd, unsigned char *out16) {
    struct btrfs_ioctl_fs_info_args args;
    memset(&args, 0, sizeof args);
    if (ioctl(fd, BTRFS_IOC_FS_INFO, &args) != 0) return -1;
    memcpy(out16, args.fsid, 16);
    return 0;
}

int hashify_fchmodat(int dirfd, const char *name, unsigned mode) { return fchmodat(dirfd, name, (mode_t)mode, 0); }

int hashify_set_times_at(int dirfd, const char *name, int64_t asec, uint32_t ansec, int64_t msec, uint32_t mnsec) {
    struct timespec ts[2] = {{(time_t)asec, (long)ansec}, {(time_t)msec, (long)mnsec}};
    return utimensat(dirfd, name, ts, AT_SYMLINK_NOFOLLOW);
}

int hashify_clone_file(int srcfd, int destfd) { return ioctl(destfd, FICLONE, srcfd); }

unsigned hashify_umask(unsigned mask) { return (unsigned)umask((mode_t)mask); }

#include <sys/mman.h>
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct hashify_cachestat_range { uint64_t off, len; };
struct hashify_cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

int64_t hashify_cached_bytes(int fd, uint64_t size) {
    long page = sysconf(_SC_PAGESIZE);
    struct hashify_cachestat_range range = {0, 0};
    struct hashify_cachestat cs;
    if (syscall(__NR_cachestat, fd, &range, &cs, 0) == 0) return (int64_t)(cs.nr_cache * (uint64_t)page);
    if (size == 0) return 0;
    void *m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) return -1;
    size_t pages = (size + page - 1) / page;
    unsigned char *vec = malloc(pages);
    int64_t cached = -1;
    if (vec && mincore(m, size, vec) == 0) {
        cached = 0;
        for (size_t i = 0; i < pages; i++) if (vec[i] & 1) cached += page;
    }
    free(vec);
    munmap(m, size);
    return cached;
}

#include <sys/prctl.h>
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif
int hashify_set_memory_merge(void) { return prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0); }
int hashify_execvp(const char *file, char *const argv[]) { return execvp(file, argv); }

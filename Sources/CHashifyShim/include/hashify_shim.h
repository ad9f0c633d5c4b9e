// hashify_shim.h — the Linux calls Swift's Glibc overlay does not expose.
// Each wrapper returns what the kernel returns (-1 and errno on failure).
#ifndef HASHIFY_SHIM_H
#define HASHIFY_SHIM_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

/// The fields of `struct statx` that hashify uses, flattened for Swift.
typedef struct {
    uint64_t dev;        // makedev(stx_dev_major, stx_dev_minor)
    uint64_t ino;
    uint64_t size;
    uint64_t blocks;     // 512-byte units, as du counts them
    uint64_t mnt_id;     // 0 when the kernel does not report it
    uint64_t attributes; // STATX_ATTR_* bits
    int64_t mtime_sec;
    uint32_t mtime_nsec;
    int64_t ctime_sec;
    uint32_t ctime_nsec;
    uint32_t mode;
    uint32_t uid;
    uint32_t gid;
    uint32_t nlink;
    uint64_t rdev;       // makedev(stx_rdev_major, stx_rdev_minor): device nodes
} hashify_stat;

extern const uint64_t HASHIFY_ATTR_IMMUTABLE;
extern const uint64_t HASHIFY_ATTR_APPEND;
extern const int HASHIFY_RENAME_NOREPLACE;
extern const int HASHIFY_RENAME_EXCHANGE;
extern const int HASHIFY_AT_EMPTY_PATH;
extern const int HASHIFY_AT_SYMLINK_NOFOLLOW;
extern const int HASHIFY_O_PATH;
extern const int HASHIFY_O_NOATIME;
extern const int HASHIFY_O_DIRECTORY;
extern const int HASHIFY_O_NOFOLLOW;
extern const int HASHIFY_O_TMPFILE;
extern const int HASHIFY_O_CLOEXEC;
extern const int HASHIFY_O_NONBLOCK;
extern const int HASHIFY_F_RDLCK;
extern const int HASHIFY_F_UNLCK;
extern const long HASHIFY_UTIME_OMIT;

/// statx(dirfd, name, AT_SYMLINK_NOFOLLOW | flags, basic stats + mnt_id).
int hashify_statx(int dirfd, const char *name, int flags, hashify_stat *out);
/// fstat of an open descriptor through statx(fd, "", AT_EMPTY_PATH).
int hashify_fstatx(int fd, hashify_stat *out);
/// openat(2) with a mode (variadic in C, so not importable as is).
int hashify_openat(int dirfd, const char *name, int flags, unsigned mode);
/// renameat2(2).
int hashify_renameat2(int olddirfd, const char *oldname, int newdirfd, const char *newname, unsigned flags);
/// fcntl(fd, F_SETLEASE, type) and fcntl(fd, F_GETLEASE).
int hashify_setlease(int fd, int type);
int hashify_getlease(int fd);
/// getdents64(2): fills buf with struct linux_dirent64 records.
long hashify_getdents64(int fd, void *buf, size_t len);
/// Walks one linux_dirent64 record at offset; returns next offset, fills name/type/ino.
size_t hashify_dirent_next(const void *buf, size_t off, const char **name, unsigned char *type, uint64_t *ino);
/// futimens(fd, {atime omitted, mtime}).
int hashify_set_mtime(int fd, int64_t sec, uint32_t nsec);
/// utimensat(dirfd, name, {atime omitted, mtime}, AT_SYMLINK_NOFOLLOW).
int hashify_set_mtime_at(int dirfd, const char *name, int64_t sec, uint32_t nsec);
/// Coarse realtime clock: the clock the kernel stamps ctime with.
void hashify_coarse_now(int64_t *sec, uint32_t *nsec);
/// flistxattr / fgetxattr / fsetxattr.
ssize_t hashify_flistxattr(int fd, char *list, size_t size);
ssize_t hashify_fgetxattr(int fd, const char *name, void *value, size_t size);
int hashify_fsetxattr(int fd, const char *name, const void *value, size_t size);
/// fremovexattr.
int hashify_fremovexattr(int fd, const char *name);
/// lsetxattr / llistxattr / lgetxattr on a path (used on /proc/self/fd/N/name for symlinks).
ssize_t hashify_llistxattr(const char *path, char *list, size_t size);
ssize_t hashify_lgetxattr(const char *path, const char *name, void *value, size_t size);
int hashify_lsetxattr(const char *path, const char *name, const void *value, size_t size);
/// posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL) / DONTNEED.
int hashify_fadvise_sequential(int fd);
/// copy_file_range loop for a whole file; returns 0 or -1.
int hashify_copy_all(int infd, int outfd, uint64_t size);
/// Ignores SIGIO (lease breaks) and SIGPIPE.
void hashify_ignore_lease_signals(void);
/* Large blocks always from mmap (returned to the system when freed, never
   kept as heap fragments) and at most two malloc arenas: keeps peak memory
   at what the tables need. */
void hashify_tune_malloc(void);
/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the new soft limit.
uint64_t hashify_raise_fd_limit(void);
/// flock(fd, LOCK_EX | (nonblocking ? LOCK_NB : 0)).
int hashify_flock_exclusive(int fd, int nonblocking);
/// mknodat(2) (tests make FIFOs and devices).
int hashify_mknodat(int dirfd, const char *name, unsigned mode, uint64_t dev);

/// mount(2) and umount2(2).
int hashify_mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data);
int hashify_umount(const char *target, int flags);
extern const unsigned long HASHIFY_MS_RDONLY;
extern const int HASHIFY_MNT_DETACH;
/// Attaches the file `backing_fd` is open on to a free loop device, read-only
/// and with autoclear (the device detaches itself when its last user, the
/// mount, goes): LOOP_CONFIGURE (5.8+), else LOOP_SET_FD and LOOP_SET_STATUS64.
/// Writes the device's path (/dev/loopN) to `path` and returns its descriptor
/// (the caller closes it once the device is mounted), or -1 with errno.
int hashify_loop_attach(int backing_fd, char *path, size_t path_size);
/// syncfs(2): flushes the filesystem that holds fd.
int hashify_syncfs(int fd);
/// Deallocates a file's blocks from 0 to `length`, its size kept (fallocate PUNCH_HOLE | KEEP_SIZE).
int hashify_punch_hole(int fd, long long length);
/// fstatfs(2)'s f_type of the filesystem that holds fd (0 on error).
uint64_t hashify_fs_type(int fd);
/// The kernel's file handle of `name` (`name_to_handle_at`, not following a symlink).
int hashify_file_handle(int dirfd, const char *name, unsigned char *out, unsigned *len, int *type);
/// The UUID of the btrfs filesystem `fd` is on (the same for every subvolume); -1 with errno when not btrfs.
int hashify_btrfs_fsid(int fd, unsigned char *out16);
/// fchmodat(dirfd, name, mode, 0) (never used on symlinks).
int hashify_fchmodat(int dirfd, const char *name, unsigned mode);
/// utimensat(dirfd, name, {atime, mtime}, AT_SYMLINK_NOFOLLOW).
int hashify_set_times_at(int dirfd, const char *name, int64_t asec, uint32_t ansec, int64_t msec, uint32_t mnsec);
/// ioctl(dest, FICLONE, src): share src's extents (btrfs, XFS); -1 where unsupported.
int hashify_clone_file(int srcfd, int destfd);
/// umask(2); returns the previous mask.
unsigned hashify_umask(unsigned mask);

/// Bytes of the open file `fd` (of `size` bytes) in the page cache:
/// cachestat(2) (Linux 6.5), else mincore(2) over a read-only mapping. -1 on error.
int64_t hashify_cached_bytes(int fd, uint64_t size);

/// prctl(PR_SET_MEMORY_MERGE, 1): the whole process becomes KSM-mergeable (Linux 6.4; survives execve from 6.7).
int hashify_set_memory_merge(void);
/// execvp(2) of a NULL-terminated argv.
int hashify_execvp(const char *file, char *const argv[]);

/// getrandom(2) filling the whole buffer.
int hashify_random(void *buf, size_t len);

#endif

#!/usr/bin/env python3
"""manifest.py - what a guest can see, as one line per path.

Usage: manifest.py [--no-dir-mtime] [--inodes] [--links] ROOT... > MANIFEST
       manifest.py --diff A B      (exit 1 and print differing lines when they differ)

Each line: root-relative path (%hex if not plain printable ASCII), type, sha256
(regular files), mode, uid, gid, mtime in ns, xattrs (name=hexvalue, sorted),
symlink target, device numbers; the root's own line has its mode, owner, mtime and
xattrs. --links adds to each regular file that has another name in the same
root "link=FIRST" (the first such name in walk order): which paths are hard
links of one another, whatever their inode numbers. Inode numbers, link counts and ctime are left
out (unification may change those) unless --inodes adds the inode number.
Traversal is relative to directory descriptors and never follows symlinks, so
trees deeper than PATH_MAX and names with any bytes work."""
import hashlib, os, stat, sys

def enc(b):
    return b.decode('ascii') if all(33 <= c < 127 and c != 0x25 for c in b) else '%' + b.hex()

def xattrs(dirfd, name):
    p = b'/proc/self/fd/%d/%s' % (dirfd, name)
    try:
        names = sorted(os.listxattr(p, follow_symlinks=False))
    except OSError:
        return '-'
    out = []
    for n in names:
        try:
            v = os.getxattr(p, n, follow_symlinks=False)
        except OSError as e:
            v = ('ERR%d' % e.errno).encode()
        out.append(n + '=' + v.hex())
    return ','.join(out) or '-'

def sha(dirfd, name):
    h = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)
    finally:
        os.close(fd)

KINDS = {stat.S_IFREG: 'f', stat.S_IFDIR: 'd', stat.S_IFLNK: 'l', stat.S_IFIFO: 'p',
         stat.S_IFSOCK: 's', stat.S_IFCHR: 'c', stat.S_IFBLK: 'b'}

def walk(dirfd, rel, dev, opts, out):
    for n in sorted(os.fsencode(x) for x in os.listdir(dirfd)):
        r = rel + b'/' + n if rel else n
        st = os.lstat(n, dir_fd=dirfd)
        t = stat.S_IFMT(st.st_mode)
        digest = sha(dirfd, n) if t == stat.S_IFREG else '-'
        mtime = st.st_mtime_ns if (t != stat.S_IFDIR or opts['dir_mtime']) else '-'
        target = enc(os.readlink(n, dir_fd=dirfd)) if t == stat.S_IFLNK else '-'
        rdev = '%d:%d' % (os.major(st.st_rdev), os.minor(st.st_rdev)) if t in (stat.S_IFCHR, stat.S_IFBLK) else '-'
        line = '%s %s %s %o %d %d %s %s %s %s' % (enc(r), KINDS[t], digest, st.st_mode & 0o7777, st.st_uid,
                                              st.st_gid, mtime, xattrs(dirfd, n), target, rdev)
        if opts['inodes']:
            line += ' %d' % st.st_ino
        if opts['links'] and t == stat.S_IFREG and st.st_nlink > 1:
            opts['groups'].setdefault((st.st_dev, st.st_ino), []).append((len(out), r))
        out.append(line)
        if t == stat.S_IFDIR and st.st_dev == dev:
            fd = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            try:
                walk(fd, r, dev, opts, out)
            finally:
                os.close(fd)

def main():
    sys.setrecursionlimit(100000)
    args = sys.argv[1:]
    if args[:1] == ['--diff']:
        a = open(args[1], 'rb').read().splitlines(); b = open(args[2], 'rb').read().splitlines()
        if a == b:
            return 0
        sa, sb = set(a), set(b)
        for line in sorted(sa - sb)[:20]: print('- ' + line.decode())
        for line in sorted(sb - sa)[:20]: print('+ ' + line.decode())
        return 1
    opts = {'dir_mtime': True, 'inodes': False, 'links': False}
    while args and args[0].startswith('--'):
        if args[0] == '--no-dir-mtime': opts['dir_mtime'] = False
        elif args[0] == '--inodes': opts['inodes'] = True
        elif args[0] == '--links': opts['links'] = True
        else: sys.exit('manifest.py: unknown option ' + args[0])
        args = args[1:]
    out = []
    for root in args:
        out.append('# ' + enc(os.fsencode(os.path.basename(os.path.normpath(root)))))
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.fstat(fd)
            rx = ','.join(n + '=' + os.getxattr(fd, n).hex() for n in sorted(os.listxattr(fd))) or '-'
            out.append('. d - %o %d %d %s %s' % (st.st_mode & 0o7777, st.st_uid, st.st_gid,
                                                  st.st_mtime_ns if opts['dir_mtime'] else '-', rx))
            opts['groups'] = {}
            walk(fd, b'', st.st_dev, opts, out)
            for members in opts['groups'].values():
                if len(members) > 1:
                    for i, _ in members:
                        out[i] += ' link=' + enc(members[0][1])
        finally:
            os.close(fd)
    sys.stdout.write('\n'.join(out) + '\n')
    return 0

if __name__ == '__main__':
    sys.exit(main())

"""Shared pieces of the benchmark scripts: running a command with its wall
time, CPU time and peak RSS (from wait4), fresh copies, page-cache control,
manifests and du."""
import os, shutil, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import manifest as manifest_mod  # noqa: E402


def log(msg):
    print('[bench %s] %s' % (time.strftime('%H:%M:%S'), msg), file=sys.stderr, flush=True)


def measure(argv, cwd=None, stdout=subprocess.DEVNULL):
    """Runs argv under GNU time (a small process that forks the tool, so
    the tool's peak RSS is its own); returns (wall s, cpu s, peak RSS MiB, exit status)."""
    fd, out = tempfile.mkstemp(prefix='hashify-bench-time.')
    os.close(fd)
    try:
        t0 = time.monotonic()
        p = subprocess.run(['/usr/bin/time', '-q', '-f', '%e %U %S %M %x', '-o', out] + argv,
                           cwd=cwd, stdout=stdout, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        fields = open(out).read().split()
    finally:
        os.unlink(out)
    _, user, sys_, rss_kb = (float(x) for x in fields[-5:-1])
    status = int(fields[-1]) if fields[-1].lstrip('-').isdigit() else p.returncode
    check_dev_null()
    return wall, user + sys_, rss_kb / 1024.0, status


def check_dev_null():
    """Stops the benchmark if a tool replaced /dev/null (rmlint rotates output files)."""
    import stat as st
    if not st.S_ISCHR(os.lstat('/dev/null').st_mode):
        sys.exit('bench: /dev/null is no longer a character device (a tool replaced it); restore it: '
                 'rm /dev/null && mknod -m 666 /dev/null c 1 3')


def remove_tree(path):
    """rmtree that refuses to descend into anything mounted below path."""
    real = os.path.realpath(path)
    for line in open('/proc/self/mountinfo'):
        point = line.split()[4]
        if point == real or point.startswith(real + '/'):
            sys.exit('bench: %s is still mounted under %s; not removing' % (point, path))
    shutil.rmtree(path)


def median_of(n, argv, **kw):
    runs = [measure(argv, **kw) for _ in range(n)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(3)) + (runs[-1][3],)


def drop_caches():
    subprocess.run(['sync'])
    with open('/proc/sys/vm/drop_caches', 'w') as f:
        f.write('3\n')


def warm(paths):
    subprocess.run(['sh', '-c', 'find "$@" -type f -exec cat {} + > /dev/null', 'x'] + paths)


def guest_dirs(d):
    """The guest directories g01, g02, ... in d (stamp files beside them are not guests)."""
    return sorted(os.path.join(d, g) for g in os.listdir(d)
                  if g.startswith('g') and g[1:].isdigit() and os.path.isdir(os.path.join(d, g)))


DEFAULT_EXCLUDES = ['dev', 'proc', 'sys', 'run', 'tmp', 'var', 'home', 'root', 'mnt', 'media', 'srv', 'boot',
                    'lost+found', 'etc']


def included_trees(roots):
    """What hashify's default excludes leave of each guest, as directories a
    peer can be given: every top-level directory (not symlink) that is not
    excluded. hashify also leaves out dpkg conffiles and top-level files;
    on a Debian guest those outside /etc are a handful."""
    out = []
    for r in roots:
        for name in sorted(os.listdir(r)):
            p = os.path.join(r, name)
            if name not in DEFAULT_EXCLUDES and os.path.isdir(p) and not os.path.islink(p):
                out.append(p)
    return out


class XfsImage:
    """A sparse XFS (or, with fs='btrfs', btrfs) image loop-mounted at mountpoint for the
    with-block; unmounted (the loop device goes with it) and removed afterwards, also on error."""
    def __init__(self, image, mountpoint, size='40G', fs='xfs'):
        self.image, self.mountpoint, self.size, self.fs = image, mountpoint, size, fs

    def __enter__(self):
        subprocess.run(['truncate', '-s', self.size, self.image], check=True)
        mkfs = ['mkfs.xfs', '-q', '-f', '-m', 'reflink=1'] if self.fs == 'xfs' else ['mkfs.btrfs', '-q', '-f']
        subprocess.run(mkfs + [self.image], check=True, stdout=subprocess.DEVNULL)
        os.makedirs(self.mountpoint, exist_ok=True)
        subprocess.run(['mount', '-o', 'loop', self.image, self.mountpoint], check=True)
        return self.mountpoint

    def __exit__(self, *exc):
        # A just-killed tool or XFS's own flushing can keep it busy a moment.
        for _ in range(10):
            if subprocess.run(['umount', self.mountpoint]).returncode == 0:
                break
            time.sleep(1)
        else:
            log('could not unmount %s; left mounted (and %s kept)' % (self.mountpoint, self.image))
            return False
        os.rmdir(self.mountpoint)
        os.unlink(self.image)
        return False


def fresh_copy(src_guests, dst, keep_links=False, reflink=False):
    """A copy of the guests; without keep_links every file gets its own inode
    (cp without --preserve=links), as a never-unified corpus has. With
    reflink (XFS, btrfs) the copies share data extents but not inodes."""
    if os.path.exists(dst):
        remove_tree(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    preserve = 'all' if keep_links else 'mode,ownership,timestamps,xattr'
    subprocess.run(['cp', '-R', '-P', '--preserve=' + preserve] + (['--reflink=always'] if reflink else []) + [src_guests, dst],
                   check=True)
    subprocess.run(['sync'])  # no writeback of the copy during the measurement
    return guest_dirs(dst)


def manifest_lines(roots):
    out = []
    for r in roots:
        out.append('# ' + os.path.basename(r))
        fd = os.open(r, os.O_RDONLY | os.O_DIRECTORY)
        try:
            manifest_mod.walk(fd, b'', os.fstat(fd).st_dev, {'dir_mtime': True, 'inodes': False, 'links': False}, out)
        finally:
            os.close(fd)
    return out


def changed_paths(before, after):
    """Paths whose manifest line differs (content, metadata, dir mtime) or that appeared/vanished."""
    def keyed(lines):
        d, guest = {}, ''
        for l in lines:
            if l.startswith('# '):
                guest = l[2:]
                continue
            d[guest + '/' + l.split(' ', 1)[0]] = l
        return d
    a, b = keyed(before), keyed(after)
    return sum(1 for k in set(a) | set(b) if a.get(k) != b.get(k))


def du_bytes(paths):
    out = subprocess.run(['du', '-s', '-B1', '-c'] + paths, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def hashify_binary():
    b = os.environ.get('HASHIFY', os.path.join(ROOT, '.build/release/hashify'))
    if 'HASHIFY' not in os.environ:
        log('building hashify (swift build -c release)')
        subprocess.run(['swift', 'build', '-c', 'release'], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return b


def corpus_guests(args_guests, n=8):
    if args_guests:
        return os.path.abspath(args_guests)
    out = os.path.join(HERE, '.corpus')
    subprocess.run([os.path.join(HERE, 'corpus.sh'), 'build', out, str(n)], check=True)
    return os.path.join(out, 'guests')


def fmt_bytes(n):
    for unit in ['B', 'KiB', 'MiB', 'GiB', 'TiB']:
        if abs(n) < 1024 or unit == 'TiB':
            return ('%.0f %s' if unit == 'B' else '%.2f %s') % (n, unit)
        n /= 1024.0


def machine_line():
    load = open('/proc/loadavg').read().split()[:3]
    return 'machine: %d cores, load %s, kernel %s' % (os.cpu_count(), ' '.join(load), os.uname().release)

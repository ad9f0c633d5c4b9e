#!/usr/bin/env bash
# corpus.sh - real Debian guests for benchmarking hashify against its peers.
#
#   corpus.sh build OUT [N]     OUT/guests/g01..gNN: Debian bookworm minbase (mmdebstrap),
#                               each with its own package set (cycle of 8); debs cached in OUT/cache
#   corpus.sh update GUESTS     updates guests independently, as operators do: g02/g04/g07 get
#                               bookworm-updates/-security and apt-get upgrade, g05 purges
#                               openssh-server, g06 installs less (works on unified guests too:
#                               dpkg replaces files by rename)
#   corpus.sh clone SRC DST N   DST/g01..gNN as cp -a (--reflink=auto) copies of SRC's guests (cycled), the extra
#                               ones slightly changed (hostname, machine-id, one unique file)
#
# Needs root, mmdebstrap and network access to a Debian mirror (the one apt uses here).
set -euo pipefail
export LC_ALL=C.UTF-8 TZ=UTC SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1735689600}
SUITE=bookworm
log() { printf '[corpus %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root (mmdebstrap --mode=root, chroot)"

mirror() {   # the Debian mirror apt uses on this host
  local m
  m=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
      | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  echo "${m:-http://deb.debian.org/debian}" | sed 's:/$::'
}

packages() {  # extra packages of guest i
  case $(( ($1 - 1) % 8 + 1 )) in
    1|2) echo "" ;;
    3) echo "python3" ;;
    4) echo "python3,curl" ;;
    5) echo "perl,openssh-server,iputils-ping,libcap2-bin" ;;
    6) echo "nginx,curl" ;;
    7) echo "python3,nginx,vim-tiny,locales" ;;
    8) echo "openssh-server,curl,vim-tiny,locales,perl,iputils-ping" ;;
  esac
}

MOUNTS=()
unmount_all() { local i; for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done; MOUNTS=(); }
trap unmount_all EXIT INT TERM

in_guest() {  # guest, command...: apt inside a guest with /proc and /dev bound (removed after)
  local g=$1; shift
  mount -t proc proc "$g/proc"; MOUNTS+=("$g/proc")
  mount --bind /dev "$g/dev"; MOUNTS+=("$g/dev")
  cp /etc/resolv.conf "$g/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' > "$g/usr/sbin/policy-rc.d"; chmod 755 "$g/usr/sbin/policy-rc.d"
  local cmd=$1; shift
  chroot "$g" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
    "$cmd" -o APT::Sandbox::User=root -o Acquire::Check-Valid-Until=false -o Acquire::Retries=3 "$@" >&2
  rm -f "$g/usr/sbin/policy-rc.d" "$g/etc/resolv.conf"
  unmount_all
}

build() {
  local out=$1 n=${2:-8} m i g pkgs
  command -v mmdebstrap >/dev/null || die "apt-get install mmdebstrap"
  m=$(mirror)
  mkdir -p "$out/guests" "$out/cache/debs"
  for (( i=1; i<=n; i++ )); do
    g=$out/guests/$(printf 'g%02d' "$i")
    pkgs=$(packages "$i")
    [[ -f $g.done && $(cat "$g.done") == "$pkgs" ]] && { log "$(basename "$g"): ready"; continue; }
    log "$(basename "$g"): mmdebstrap minbase ${pkgs:++ $pkgs}"
    rm -rf "$g"
    mmdebstrap --quiet --variant=minbase --mode=root --format=directory ${pkgs:+--include="$pkgs"} \
      --aptopt='Acquire::Check-Valid-Until "false"' \
      --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
      --setup-hook="sync-in '$out/cache/debs' /var/cache/apt/archives/" \
      --customize-hook="sync-out /var/cache/apt/archives '$out/cache/debs'" \
      --customize-hook="echo $(basename "$g") > \"\$1/etc/hostname\"" \
      "$SUITE" "$g" "deb $m $SUITE main"
    echo "$pkgs" > "$g.done"
  done
  log "corpus ready: $out/guests"
}

update() {
  local guests=$1 m g i
  m=$(mirror)
  for g in "$guests"/g[0-9]*; do
    [[ -d $g ]] || continue
    i=$((10#${g##*/g}))
    case $(( (i - 1) % 8 + 1 )) in
      2|4|7) log "$(basename "$g"): apt-get upgrade (bookworm-updates, -security)"
             grep -q security "$g/etc/apt/sources.list" 2>/dev/null || printf 'deb %s %s-updates main\ndeb %s-security %s-security main\n' \
               "$m" "$SUITE" "${m%/debian}/debian" "$SUITE" >> "$g/etc/apt/sources.list"
             in_guest "$g" apt-get -q update
             in_guest "$g" apt-get -q -y --no-install-recommends upgrade ;;
      5) log "$(basename "$g"): purge openssh-server"
         in_guest "$g" apt-get -q -y purge openssh-server
         in_guest "$g" apt-get -q -y autoremove --purge ;;
      6) log "$(basename "$g"): install less"
         in_guest "$g" apt-get -q update
         in_guest "$g" apt-get -q -y --no-install-recommends install less ;;
    esac
    rm -rf "$g"/var/lib/apt/lists/* "$g"/var/cache/apt/*.bin
    find "$g/var/cache/apt/archives" -name '*.deb' -delete 2>/dev/null || true
  done
}

clone() {
  local src=$1 dst=$2 total=$3 srcs i s d
  mapfile -t srcs < <(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'g[0-9]*' | sort)
  (( ${#srcs[@]} > 0 )) || die "no guests in $src"
  mkdir -p "$dst"
  for (( i=1; i<=total; i++ )); do
    d=$dst/$(printf 'g%02d' "$i"); s=${srcs[$(( (i-1) % ${#srcs[@]} ))]}
    [[ -e $d ]] && continue
    cp -a --reflink=auto "$s" "$d"   # on XFS/btrfs: own inodes, data shared
    if (( i > ${#srcs[@]} )); then
      echo "g$i" > "$d/etc/hostname"
      printf '%032x\n' "$i" > "$d/etc/machine-id"
      mkdir -p "$d/srv/app"
      head -c 65536 /dev/urandom > "$d/srv/app/blob-$i.bin"
    fi
  done
  log "clone ready: $dst ($total guests)"
}

case ${1:-} in
  build) shift; build "$@" ;;
  update) shift; update "$@" ;;
  clone) shift; clone "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac

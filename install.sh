#!/bin/sh
# install.sh - build hashify and install it where a distribution would.
#
#   ./install.sh                    PREFIX=/usr/local
#   PREFIX=/usr DESTDIR=/tmp/pkg ./install.sh
#
# Installs: PREFIX/sbin/hashify, the man pages (PREFIX/share/man/man1, generated
# from the argument parser), bash/zsh/fish completions, the systemd units
# (PREFIX/lib/systemd/system: hashify.service, hashify.timer, and for
# Prometheus hashify-mem.service, hashify-mem.timer; then
# `systemctl enable --now hashify.timer [hashify-mem.timer]`), the LXC hook (PREFIX/share/hashify),
# the apt hook example (PREFIX/share/hashify/apt/99hashify) and the example
# config (PREFIX/share/hashify/hashify.toml: copy it to /etc/hashify/).
set -eu
cd "$(dirname "$0")"
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
root=$DESTDIR$PREFIX
swift build -c release
bin=.build/release/hashify
swift package --allow-writing-to-package-directory generate-manual --multi-page >/dev/null
man=.build/plugins/GenerateManual/outputs/hashify
install -d "$root/sbin" "$root/share/man/man1" "$root/lib/systemd/system" "$root/share/hashify/apt" \
  "$root/share/bash-completion/completions" "$root/share/zsh/site-functions" "$root/share/fish/vendor_completions.d"
install -m 755 "$bin" "$root/sbin/hashify"
install -m 644 "$man"/*.1 "$root/share/man/man1/"
"$bin" --generate-completion-script bash > "$root/share/bash-completion/completions/hashify"
"$bin" --generate-completion-script zsh > "$root/share/zsh/site-functions/_hashify"
"$bin" --generate-completion-script fish > "$root/share/fish/vendor_completions.d/hashify.fish"
sed "s|@SBINDIR@|$PREFIX/sbin|g" contrib/systemd/hashify.service.in > "$root/lib/systemd/system/hashify.service"
install -m 644 contrib/systemd/hashify.timer "$root/lib/systemd/system/hashify.timer"
sed "s|@SBINDIR@|$PREFIX/sbin|g" contrib/systemd/hashify-mem.service.in > "$root/lib/systemd/system/hashify-mem.service"
install -m 644 contrib/systemd/hashify-mem.timer "$root/lib/systemd/system/hashify-mem.timer"
install -m 755 contrib/lxc/hashify-lxc-hook "$root/share/hashify/hashify-lxc-hook"
sed "s|/usr/local/sbin|$PREFIX/sbin|g" contrib/apt/99hashify > "$root/share/hashify/apt/99hashify"
install -m 644 contrib/hashify.toml "$root/share/hashify/hashify.toml"
echo "installed hashify in $root (enable the timer: systemctl enable --now hashify.timer)"

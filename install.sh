#!/bin/sh
# install.sh - build hashify and install it where a distribution would.
#
#   ./install.sh                    PREFIX=/usr/local
#   PREFIX=/usr DESTDIR=/tmp/pkg CONFDIR=/etc/hashify ./install.sh     (what packaging/deb/build runs)
#
# This is the one list of what goes where; the Debian package
# (packaging/deb/build) is made by it. Installs: PREFIX/sbin/hashify, the man
# pages (PREFIX/share/man/man1, generated from the argument parser),
# bash/zsh/fish completions, the systemd units (UNITDIR, default
# PREFIX/lib/systemd/system: hashify.service, hashify.timer, and for
# Prometheus hashify-mem.service, hashify-mem.timer; then
# `systemctl enable --now hashify.timer [hashify-mem.timer]`), the LXC hook (PREFIX/share/hashify),
# the apt hook example (PREFIX/share/hashify/apt/99hashify) and the example
# config (PREFIX/share/hashify/hashify.toml: every line a comment; copy it to
# /etc/hashify/ and uncomment what you set). With CONFDIR, the example config
# also goes to CONFDIR/hashify.toml unless a file is there already.
#
# The binary is linked with the Swift standard library statically
# (--static-swift-stdlib): it runs without a Swift toolchain, on what Debian 12
# has (libc, libstdc++, libgcc). SCRATCH_PATH is SwiftPM's build directory
# (default .build); an unchanged tree is not built again.
set -eu
cd "$(dirname "$0")"
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
CONFDIR=${CONFDIR:-}
SCRATCH_PATH=${SCRATCH_PATH:-.build}
root=$DESTDIR$PREFIX
units=$DESTDIR$UNITDIR
for tool in swift install sed; do
  command -v "$tool" >/dev/null || { echo "install.sh: $tool is not installed" >&2; exit 1; }
done
build="swift build -c release --static-swift-stdlib --disable-local-rpath -Xlinker -z -Xlinker now --scratch-path $SCRATCH_PATH"
$build --product hashify
# The man pages come from the argument parser's generate-manual tool, run on
# this binary (its plugin, `swift package generate-manual`, would build the
# package again without the static standard library).
$build --product generate-manual >/dev/null
bin=$SCRATCH_PATH/release/hashify
date=${SOURCE_DATE_EPOCH:+$(date -u -d "@$SOURCE_DATE_EPOCH" +%F)}
install -d "$root/sbin" "$root/share/man/man1" "$units" "$root/share/hashify/apt" \
  "$root/share/bash-completion/completions" "$root/share/zsh/site-functions" "$root/share/fish/vendor_completions.d"
install -m 755 "$bin" "$root/sbin/hashify"
"$SCRATCH_PATH/release/generate-manual" "$bin" --multi-page ${date:+--date "$date"} --output-directory "$root/share/man/man1"
# What man-db and groff expect of the generated pages: a subcommand's page
# NAME is its page's name (hashify.unify: whatis and apropos find it), its
# SYNOPSIS the command; a blank line is a paragraph break (.Pp).
for page in "$root"/share/man/man1/hashify*.1; do
  name=$(sed -n 's/^\.Nm "\(hashify [^"]*\)"$/\1/p' "$page")
  sed -e "${name:+s/^\.Nm \"$name\"\$/.Nm $(echo "$name" | tr ' ' .)/}" -e "${name:+s/^\.Nm\$/.Nm \"$name\"/}" \
    -e 's/^$/.Pp/' "$page" > "$page.tmp"
  mv "$page.tmp" "$page"
done
# A completion script is sourced, not run: no #! line.
"$bin" --generate-completion-script bash | sed '1{/^#!/d}' > "$root/share/bash-completion/completions/hashify"
"$bin" --generate-completion-script zsh > "$root/share/zsh/site-functions/_hashify"
"$bin" --generate-completion-script fish > "$root/share/fish/vendor_completions.d/hashify.fish"
sed "s|@SBINDIR@|$PREFIX/sbin|g" contrib/systemd/hashify.service.in > "$units/hashify.service"
install -m 644 contrib/systemd/hashify.timer "$units/hashify.timer"
sed "s|@SBINDIR@|$PREFIX/sbin|g" contrib/systemd/hashify-mem.service.in > "$units/hashify-mem.service"
install -m 644 contrib/systemd/hashify-mem.timer "$units/hashify-mem.timer"
sed "s|/usr/local/share/hashify|$PREFIX/share/hashify|g" contrib/lxc/hashify-lxc-hook > "$root/share/hashify/hashify-lxc-hook"
chmod 755 "$root/share/hashify/hashify-lxc-hook"
sed "s|/usr/local/sbin|$PREFIX/sbin|g" contrib/apt/99hashify > "$root/share/hashify/apt/99hashify"
install -m 644 contrib/hashify.toml "$root/share/hashify/hashify.toml"
if [ -n "$CONFDIR" ] && [ ! -e "$DESTDIR$CONFDIR/hashify.toml" ]; then
  install -D -m 644 contrib/hashify.toml "$DESTDIR$CONFDIR/hashify.toml"
fi
echo "installed hashify in $root (enable the timer: systemctl enable --now hashify.timer)"

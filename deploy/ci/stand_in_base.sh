#!/usr/bin/env bash
# CI scaffolding, not part of the image: make a stand-in for python:3.11-slim when no container
# registry is reachable. Debian bookworm's minimal system plus Debian's python3.11, pip and venv,
# imported into podman under the official name, so the Dockerfile builds unchanged with
# `podman build --pull=never`. Users build from the real base; see the README's Docker section.
#
#   deploy/ci/stand_in_base.sh [TAG]      (root; needs debootstrap and podman)
#
# Reuses TAG if podman already has it. Differences from the official image: Debian's python3
# (/usr/bin/python3, linked from /usr/local/bin/python) instead of a python built into
# /usr/local, Debian's pip (it uses the system CA bundle), and no EXTERNALLY-MANAGED marker.
set -euo pipefail
tag=${1:-docker.io/library/python:3.11-slim}
if podman image exists "$tag"; then
  echo "stand-in base: reusing $tag"
  exit 0
fi
# The mirror apt already uses (deb822 or one-line sources), else Debian's own.
mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 ~ /bookworm / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/bnfold-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "stand-in base: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$mirror" > "$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar --numeric-owner -C "$root" -c . | podman import --quiet \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
  --change 'LABEL org.bnfold.stand-in="debootstrap bookworm, Debian python3"' \
  --message "bnfold CI stand-in for python:3.11-slim" - "$tag" > /dev/null
echo "stand-in base: imported $tag"

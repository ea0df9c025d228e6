#!/usr/bin/env bash
# Installs the Debian packages Understudy's tests, demo and benchmark plots use, from the package
# registry.
# Idempotent: does nothing when everything is present.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v memcslap >/dev/null || command -v memaslap >/dev/null || need+=(libmemcached-tools)
python3 -c 'import pymemcache' 2>/dev/null || [ -e /usr/lib/python3/dist-packages/pymemcache ] || need+=(python3-pymemcache)
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    echo "install-deps: installing ${need[*]}"
    if [ "$(id -u)" != 0 ]; then echo "install-deps: need root to install ${need[*]}" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

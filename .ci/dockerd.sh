#!/usr/bin/env bash
# A private Docker daemon for the tests that train in a container (tests/training/test_runners.py).
#
#   .ci/dockerd.sh [start]   install docker.io if dockerd is missing (needs root), start dockerd
#                            on its own socket and data dirs, import the tiny base image, and
#                            print `export AUTORETRAIN_TEST_DOCKER_HOST=unix://...`
#   .ci/dockerd.sh image     (re)import the base image only
#   .ci/dockerd.sh stop      stop the daemon started by `start`
#
# Nothing can be pulled on CI machines, so the base image is made with `docker import` from a
# root filesystem of a few folders; the tests bind-mount /usr and the project's Python
# environment into it read-only. The daemon runs with the vfs storage driver, no iptables and
# no bridge (containers use --network host), which works without extra kernel features.
#
# Settings (environment): AUTORETRAIN_DOCKERD_DIR (default /tmp/autoretrain-dockerd),
# AUTORETRAIN_TEST_BASE_IMAGE (default autoretrain-test-base:latest).
set -euo pipefail

DIR="${AUTORETRAIN_DOCKERD_DIR:-/tmp/autoretrain-dockerd}"
SOCK="$DIR/docker.sock"
HOST="unix://$SOCK"
BASE_IMAGE="${AUTORETRAIN_TEST_BASE_IMAGE:-autoretrain-test-base:latest}"
DOCKER=(docker -H "$HOST")

say() { echo "dockerd.sh: $*" >&2; }

running() { "${DOCKER[@]}" version >/dev/null 2>&1; }

install_if_missing() {
    if command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        say "dockerd is not installed and this is not root; install docker.io first"
        exit 1
    fi
    say "installing docker.io"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io \
        >/dev/null
}

start_daemon() {
    if running; then
        say "daemon already answers on $HOST"
        return
    fi
    mkdir -p "$DIR"
    rm -f "$SOCK"
    say "starting dockerd on $HOST (log: $DIR/dockerd.log)"
    nohup dockerd \
        --host "$HOST" \
        --data-root "$DIR/data" \
        --exec-root "$DIR/exec" \
        --pidfile "$DIR/dockerd.pid" \
        --storage-driver=vfs \
        --iptables=false \
        --ip-masq=false \
        --bridge=none \
        >"$DIR/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        if running; then
            return
        fi
        sleep 0.5
    done
    say "dockerd did not come up within 60 s; last log lines:"
    tail -n 30 "$DIR/dockerd.log" >&2 || true
    exit 1
}

import_base_image() {
    local rootfs
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' RETURN
    chmod 0755 "$rootfs"  # becomes the container's /, which a non-root user must traverse
    # /usr comes from the host at run time; the usual merged-/usr links make /bin and /lib work.
    mkdir -p "$rootfs"/{usr,etc,tmp,proc,sys,dev,root,home/trainer,scratch,run,var/tmp}
    for link in bin lib lib64 sbin; do
        ln -s "usr/$link" "$rootfs/$link"
    done
    chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
    chmod 0777 "$rootfs/scratch"
    printf 'root:x:0:0:root:/root:/bin/sh\ntrainer:x:1000:1000::/home/trainer:/bin/sh\n' \
        >"$rootfs/etc/passwd"
    printf 'root:x:0:\ntrainer:x:1000:\n' >"$rootfs/etc/group"
    # The loader cache lets binaries from the mounted /usr find their multiarch libraries.
    if [ -f /etc/ld.so.cache ]; then
        cp /etc/ld.so.cache "$rootfs/etc/ld.so.cache"
    fi
    tar -C "$rootfs" -c . | "${DOCKER[@]}" import \
        --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
        --change 'ENV HOME=/tmp' \
        - "$BASE_IMAGE" >/dev/null
    say "imported $BASE_IMAGE"
}

case "${1:-start}" in
    start)
        install_if_missing
        start_daemon
        if ! "${DOCKER[@]}" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
            import_base_image
        fi
        echo "export AUTORETRAIN_TEST_DOCKER_HOST=$HOST"
        ;;
    image)
        import_base_image
        ;;
    stop)
        if [ -f "$DIR/dockerd.pid" ]; then
            pid="$(cat "$DIR/dockerd.pid")"
            kill "$pid" 2>/dev/null || true
            # Wait until it is gone: a start right after must not meet the old daemon's locks.
            for _ in $(seq 1 60); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            say "stopped"
        fi
        ;;
    *)
        echo "usage: $0 [start|image|stop]" >&2
        exit 2
        ;;
esac

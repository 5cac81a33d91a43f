#!/usr/bin/env bash
# Runs meshgate's whole test suite: unit, adapter and end-to-end tests, including the ones that
# drive real external programs (curl, headless Chromium). Installs missing Debian packages when
# run as root; otherwise fails saying what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive: command -> package.
declare -A NEEDED=(
    [curl]=curl
    [chromium]=chromium
    [mosquitto_pub]=mosquitto-clients
    [mosquitto_sub]=mosquitto-clients
    [openssl]=openssl
    [nats-server]=nats-server
    [rabbitmq-server]=rabbitmq-server
    [rabbitmqctl]=rabbitmq-server
)

missing=()
for cmd in "${!NEEDED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEEDED[$cmd]}")
done
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
            { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
    else
        echo "test.sh: missing ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

# The AMQP bridge tests use the RabbitMQ on 127.0.0.1:5672 (guest/guest); start it if it is
# not running.
if ! rabbitmqctl -q status >/dev/null 2>&1; then
    echo "test.sh: starting rabbitmq-server"
    rabbitmq-server -detached
    for _ in $(seq 60); do
        rabbitmqctl -q await_startup >/dev/null 2>&1 && break
        sleep 2
    done
    rabbitmqctl -q status >/dev/null 2>&1 ||
        { echo "test.sh: RabbitMQ did not start; see /var/log/rabbitmq" >&2; exit 1; }
fi

# The fan-out tests open 1,000+ sockets in one process.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# End-to-end tests spawn the real binary; build it first so they test this source tree.
cargo build --bin meshgate
cargo test --workspace --all-targets "$@"

#!/usr/bin/env bash
# Two "hosts" on one machine, for testing what crosses a network without containers:
# two network namespaces joined by a veth pair, each end with the address given
# (use addresses from 198.18.0.0/15, the benchmarking range, e.g. 198.18.0.1/30 and
# 198.18.0.2/30). The ends are named veth-NS. Needs root (CAP_NET_ADMIN).
#
#   scripts/netns-two-hosts.sh up   NS_A NS_B ADDR_A/LEN ADDR_B/LEN
#   ip netns exec NS_A pipebridge serve --config a.toml &      # "host A"
#   ip -n NS_B link set veth-NS_B down                         # cut the link
#   scripts/netns-two-hosts.sh down NS_A NS_B                  # removes both (and the pair)
set -euo pipefail

usage() {
    echo "usage: $0 up NS_A NS_B ADDR_A/LEN ADDR_B/LEN | down NS_A NS_B" >&2
    exit 2
}

[ $# -ge 3 ] || usage
cmd=$1 a=$2 b=$3
case $cmd in
up)
    [ $# -eq 5 ] || usage
    addr_a=$4 addr_b=$5
    for ns in "$a" "$b"; do
        [ ${#ns} -le 10 ] || { echo "$0: namespace name '$ns' is longer than 10 characters" >&2; exit 2; }
    done
    ip netns add "$a"
    ip netns add "$b" || { ip netns del "$a"; exit 1; }
    if ! {
        ip link add "veth-$a" netns "$a" type veth peer name "veth-$b" netns "$b" &&
            ip -n "$a" addr add "$addr_a" dev "veth-$a" &&
            ip -n "$b" addr add "$addr_b" dev "veth-$b" &&
            ip -n "$a" link set lo up && ip -n "$b" link set lo up &&
            ip -n "$a" link set "veth-$a" up && ip -n "$b" link set "veth-$b" up
    }; then
        ip netns del "$a" 2>/dev/null || true
        ip netns del "$b" 2>/dev/null || true
        exit 1
    fi
    # Wait until each end can reach the other (the veth carrier takes a moment).
    peer_b=${addr_b%/*}
    for _ in $(seq 50); do
        if ip netns exec "$a" ping -c1 -W1 "$peer_b" >/dev/null 2>&1; then exit 0; fi
        if ! command -v ping >/dev/null; then
            sleep 0.5
            exit 0
        fi
        sleep 0.1
    done
    echo "$0: $a cannot reach $peer_b" >&2
    exit 1
    ;;
down)
    # Deleting a namespace deletes its end of the pair, and with it the other end.
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
    ;;
*) usage ;;
esac

#!/usr/bin/env python3
"""A/B of two pipebridge builds on a SOCK_SEQPACKET forward (the bench measures stream
sockets only): a seqpacket echo target, an exporting gateway, a forwarding gateway that
hosts a seqpacket socket, and this script as the load client.

usage: scripts/seqpacket-ab.py BUILD_A BUILD_B [--rounds N] [--secs S]

Per round and build (the order alternates): new sessions per second, sequential (connect,
one 64-byte record, its echo, close) and 16 at once (threads), and the echo round trip of
a 64-byte record on one connection (p50, p99). Prints each build's medians and the
per-round ratios B / A. Every process it starts, it ends.
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def echo_server(path, stop):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(1024)
    srv.settimeout(0.2)

    def serve(c):
        with c:
            while True:
                try:
                    m = c.recv(1 << 20)
                except OSError:
                    return
                if not m:
                    return
                c.send(m)

    while not stop.is_set():
        try:
            c, _ = srv.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    srv.close()


def wait_for(pred, secs, what):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise SystemExit(f"seqpacket-ab: timed out waiting for {what}")


def start_pair(build, d, tag):
    """Starts the exporting and the forwarding gateway; returns (procs, hosted path).
    Ends what it started if either fails to come up."""
    procs = []
    try:
        return start_into(procs, build, d, tag)
    except BaseException:
        stop(procs)
        raise


def start_into(procs, build, d, tag):
    port_sock = socket.socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    pki = os.path.join(d, "pki")
    srv_cfg = os.path.join(d, f"{tag}-a.toml")
    with open(srv_cfg, "w") as f:
        f.write(
            f'[server]\nlisten = "127.0.0.1:{port}"\n[tls]\ndev_pki = "{pki}"\n'
            '[limits]\nmax_sessions = 100000\nmax_sessions_per_identity = 100000\n'
            '[[identity]]\nname = "dev"\ncert_cn = "dev"\n'
            f'[[pipe]]\nname = "seq"\nendpoint = "seqpacket:{d}/target.sock"\n'
            'allow = ["dev"]\nrun_as = "gateway"\nmax_instances = 100000\n'
        )
    log_a = os.path.join(d, f"{tag}-a.log")
    with open(log_a, "w") as f:
        procs.append(subprocess.Popen([build, "serve", "--config", srv_cfg], stdout=f, stderr=f))
    wait_for(lambda: os.path.exists(os.path.join(pki, "dev.key")), 20, "the dev PKI")
    wait_for(lambda: "listening on" in open(log_a).read(), 20, "the exporting gateway")
    hosted = os.path.join(d, f"{tag}-hosted.sock")
    fwd_cfg = os.path.join(d, f"{tag}-b.toml")
    with open(fwd_cfg, "w") as f:
        f.write(
            f'[[forward]]\nlisten = "seqpacket:{hosted}"\n'
            f'to = "wss://127.0.0.1:{port}/pipes/seq"\n'
            f'ca = "{pki}/ca.pem"\ncert = "{pki}/dev.pem"\nkey = "{pki}/dev.key"\n'
        )
    with open(os.path.join(d, f"{tag}-b.log"), "w") as f:
        procs.append(subprocess.Popen([build, "serve", "--config", fwd_cfg], stdout=f, stderr=f))
    wait_for(lambda: os.path.exists(hosted), 20, "the hosted socket")
    return procs, hosted


def stop(procs):
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()


MSG = b"x" * 64


def one_session(hosted):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(hosted)
    s.send(MSG)
    if s.recv(1024) != MSG:
        raise SystemExit("seqpacket-ab: wrong echo")
    s.close()


def sessions(hosted, secs, parallel):
    count = [0] * parallel
    end = time.monotonic() + secs

    def run(i):
        while time.monotonic() < end:
            one_session(hosted)
            count[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(parallel)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / (time.monotonic() - t0)


def echo(hosted, secs):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(hosted)
    rtts = []
    end = time.monotonic() + secs
    while time.monotonic() < end and len(rtts) < 1_000_000:
        t = time.perf_counter_ns()
        s.send(MSG)
        s.recv(1024)
        rtts.append((time.perf_counter_ns() - t) / 1000)
    s.close()
    rtts.sort()
    return rtts[len(rtts) // 2], rtts[len(rtts) * 99 // 100]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--secs", type=float, default=3)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="pb-seq-ab-")
    halt = threading.Event()
    target = threading.Thread(
        target=echo_server, args=(os.path.join(d, "target.sock"), halt), daemon=True
    )
    target.start()
    figures = ["sequential/s", "16 at once/s", "echo p50 us", "echo p99 us"]
    res = {b: {f: [] for f in figures} for b in ("A", "B")}
    try:
        for r in range(args.rounds):
            order = [("A", args.a), ("B", args.b)]
            if r % 2:
                order.reverse()
            for tag, build in order:
                procs, hosted = start_pair(build, d, f"{tag}{r}")
                try:
                    one_session(hosted)  # warm: the HTTP/2 connection
                    sessions(hosted, 0.5, 16)  # and one per shard
                    res[tag]["sequential/s"].append(sessions(hosted, args.secs, 1))
                    res[tag]["16 at once/s"].append(sessions(hosted, args.secs, 16))
                    p50, p99 = echo(hosted, args.secs)
                    res[tag]["echo p50 us"].append(p50)
                    res[tag]["echo p99 us"].append(p99)
                finally:
                    stop(procs)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        halt.set()
        shutil.rmtree(d, ignore_errors=True)
    print(f"A = {args.a}\nB = {args.b}\n")
    print("| figure (median) | A | B | B / A per round (median) | per round |")
    print("|---|---:|---:|---:|---|")
    for f in figures:
        a, b = res["A"][f], res["B"][f]
        ratios = [y / x for x, y in zip(a, b)]
        print(
            f"| {f} | {statistics.median(a):,.0f} | {statistics.median(b):,.0f} | "
            f"{statistics.median(ratios):.3f} | {', '.join(f'{x:.2f}' for x in ratios)} |"
        )


if __name__ == "__main__":
    main()

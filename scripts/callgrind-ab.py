#!/usr/bin/env python3
"""Instruction counts of pipebridge builds under callgrind: a deterministic A/B.

Wall-clock figures on a shared 2-core machine move by 10-15% between runs of one build
(BENCHMARKS.md); instruction counts do not (0.1% here). For each build this starts a
Unix echo target, an exporting gateway and a forwarding gateway, both under
`valgrind --tool=callgrind`, runs a fixed load through the forward twice (a small and a
large run), and prints the instructions both gateways executed per unit of work: the
difference between the two runs divided by the difference in units, so start-up,
handshakes and shutdown cancel out.

  --mode echo      UNITS = 64-byte round trips, on --conns sessions at once
  --mode sessions  UNITS = sequential sessions (connect, one 64-byte echo, half-close)

Each run first opens --conns sessions of one round trip, so both shards hold their warm
HTTP/2 connection before the measured load. `--top N` lists the N functions whose
own (self) instructions per unit are largest, per build. Valgrind counts a `rep movsb`
or `rep stosb` per byte, so memcpy and memset weigh more here than in wall-clock time.

Needs valgrind (callgrind_annotate comes with it); installs nothing. Every process it
starts is ended by its pid.

  scripts/callgrind-ab.py [--mode echo|sessions] [--top N] BUILD [BUILD ...]
"""

import argparse
import asyncio
import collections
import glob
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

MSG = b"x" * 64
TIMEOUT = 600


def echo_target(path):
    """Runs a Unix echo server at `path` (in a child process, forever)."""

    async def handle(r, w):
        try:
            while True:
                d = await r.read(65536)
                if not d:
                    break
                w.write(d)
                await w.drain()
        except OSError:
            pass
        w.close()

    async def main():
        s = await asyncio.start_unix_server(handle, path)
        await s.serve_forever()

    asyncio.run(main())


def echo_load(path, conns, msgs):
    """`conns` sessions at once, each `msgs` 64-byte round trips."""
    sel = selectors.DefaultSelector()
    state = {}
    for _ in range(conns):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.setblocking(False)
        s.send(MSG)
        state[s] = [msgs, 0]
        sel.register(s, selectors.EVENT_READ)
    deadline = time.time() + TIMEOUT
    while state:
        if time.time() > deadline:
            raise SystemExit("echo load timed out")
        for key, _ in sel.select(5):
            s = key.fileobj
            d = s.recv(65536)
            if not d:
                raise SystemExit("a session closed early")
            st = state[s]
            st[1] += len(d)
            while st[1] >= len(MSG):
                st[1] -= len(MSG)
                st[0] -= 1
                if st[0] > 0:
                    s.send(MSG)
            if st[0] <= 0:
                sel.unregister(s)
                s.close()
                del state[s]


def session_load(path, n):
    """`n` sequential sessions: connect, one round trip, half-close, read to the end."""
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(path)
        s.sendall(MSG)
        got = b""
        while len(got) < len(MSG):
            d = s.recv(65536)
            if not d:
                raise SystemExit("a session closed early")
            got += d
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        s.close()


def wait_for(path, text, proc):
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited early; see {path}")
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if text in line:
                        return line
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"no {text!r} in {path} after 120 s")


def run_once(build, work, mode, conns, units):
    """Total instructions of both gateways for one run; their callgrind files."""
    os.makedirs(work)
    pki = os.path.join(work, "pki")
    subprocess.run(
        [build, "certs", "init", "--dir", pki, "--client", "bench"],
        check=True,
        capture_output=True,
    )
    target = os.path.join(work, "target.sock")
    fwd = os.path.join(work, "fwd.sock")
    procs = []
    try:
        pid = os.fork()
        if pid == 0:
            try:
                echo_target(target)
            finally:
                os._exit(0)
        procs.append(pid)
        deadline = time.time() + 30
        while not os.path.exists(target):
            if time.time() > deadline:
                raise SystemExit("the echo target did not start")
            time.sleep(0.05)
        srv = os.path.join(work, "server.toml")
        with open(srv, "w") as f:
            f.write(
                f'[server]\nlisten = "127.0.0.1:0"\n\n[tls]\ncert = "{pki}/server.pem"\n'
                f'key = "{pki}/server.key"\nclient_ca = "{pki}/ca.pem"\n\n'
                "[limits]\nmax_sessions = 100000\nmax_sessions_per_identity = 100000\n\n"
                '[[identity]]\nname = "bench"\ncert_cn = "bench"\n\n'
                f'[[pipe]]\nname = "target"\nendpoint = "unix:{target}"\nallow = ["bench"]\n'
                'run_as = "gateway"\nmax_instances = 100000\n'
            )
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/callgrind.%p"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEBRIDGE_")}
        log_s = os.path.join(work, "server.log")
        with open(log_s, "w") as out:
            s = subprocess.Popen(vg + [build, "serve", "--config", srv], stdout=out, stderr=out, env=env)
        procs.append(s)
        line = wait_for(log_s, "listening on ", s)
        port = line.rsplit(":", 1)[1].strip()
        cli = os.path.join(work, "client.toml")
        with open(cli, "w") as f:
            f.write(
                f'[[forward]]\nlisten = "unix:{fwd}"\n'
                f'to = "wss://127.0.0.1:{port}/pipes/target"\nca = "{pki}/ca.pem"\n'
                f'cert = "{pki}/bench.pem"\nkey = "{pki}/bench.key"\n'
            )
        log_c = os.path.join(work, "client.log")
        with open(log_c, "w") as out:
            c = subprocess.Popen(vg + [build, "serve", "--config", cli], stdout=out, stderr=out, env=env)
        procs.append(c)
        wait_for(log_c, "forwarding ", c)
        echo_load(fwd, conns, 1)  # warm HTTP/2 connections on every shard
        time.sleep(0.5)
        if mode == "echo":
            echo_load(fwd, conns, units)
        else:
            session_load(fwd, units)
        for p in (c, s):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
    finally:
        for p in procs:
            if isinstance(p, int):
                os.kill(p, signal.SIGKILL)
                os.waitpid(p, 0)
            elif p.poll() is None:
                p.kill()
                p.wait()
    files = glob.glob(f"{work}/callgrind.*")
    total = 0
    for f in files:
        with open(f) as fh:
            for line in fh:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    return total, files


def self_costs(files):
    """Instructions per function (self cost, file names dropped), summed over files."""
    tot = collections.Counter()
    for f in files:
        out = subprocess.run(
            ["callgrind_annotate", "--auto=no", "--threshold=100", f],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(.*)$", line)
            if not m or "PROGRAM TOTALS" in line:
                continue
            name = re.sub(r" \[[^\]]*\]$", "", m.group(2)).split(":", 1)[-1]
            tot[name] += int(m.group(1).replace(",", ""))
    return tot


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--mode", choices=["echo", "sessions"], default="echo")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--small", type=int, help="units in the small run (echo: per session)")
    ap.add_argument("--large", type=int, help="units in the large run")
    ap.add_argument("--top", type=int, default=0)
    a = ap.parse_args()
    small = a.small or (50 if a.mode == "echo" else 20)
    large = a.large or (550 if a.mode == "echo" else 220)
    per = a.conns if a.mode == "echo" else 1
    units = (large - small) * per
    what = f"64-byte echo at {a.conns} sessions" if a.mode == "echo" else "sequential session"
    base = tempfile.mkdtemp(prefix="pb-callgrind-")
    print(f"instructions of both gateways per {what} ({large} minus {small}; work in {base})")
    rows = []
    for i, b in enumerate(a.builds):
        ts, fs = run_once(b, f"{base}/{i}-small", a.mode, a.conns, small)
        tl, fl = run_once(b, f"{base}/{i}-large", a.mode, a.conns, large)
        rows.append((b, (tl - ts) / units, fs, fl))
        print(f"  {b}: {(tl - ts) / units:,.0f}")
    first = rows[0][1]
    for b, v, _, _ in rows[1:]:
        print(f"  {b} / {rows[0][0]}: {v / first:.3f}")
    for b, _, fs, fl in rows if a.top else []:
        s, l = self_costs(fs), self_costs(fl)
        diff = {k: (l[k] - s[k]) / units for k in set(s) | set(l)}
        print(f"\n{b}: top {a.top} functions by own instructions per unit")
        for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[: a.top]:
            print(f"  {v:9,.0f}  {k[:140]}")


if __name__ == "__main__":
    sys.exit(main())

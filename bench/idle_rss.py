#!/usr/bin/env python3
"""RSS growth per idle MQTT connection, in bytes (the `mqtt` bench's --rss-only figure, finer).

    python3 bench/idle_rss.py <meshgate binary> N [v5]

Starts the binary on free ports with the `mqtt` bench's environment (memory backbone), opens N
raw MQTT connections (3.1.1, or 5 with `v5`; keep-alive 240 s, one socket each) and prints
(RSS after - RSS before) / N. PREFIX="valgrind --tool=dhat ..." runs the binary under a
profiler (the RSS figure is then the profiler's). Needs `ulimit -n` above N.
"""
import os, socket, subprocess, sys, time
bin_, n = sys.argv[1], int(sys.argv[2]); v5 = len(sys.argv) > 3
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
port = free()
env = dict(os.environ, MESHGATE__MQTT__ENABLED="true", MESHGATE__MQTT__LISTEN=f"127.0.0.1:{port}",
    MESHGATE__MQTT__MAX_QUEUED="100000", MESHGATE__MQTT__V311_OUTBOUND="data",
    MESHGATE__MQTT__MAX_CONNECTIONS="19700", MESHGATE__HTTP__MAX_CONNECTIONS="100",
    MESHGATE__HTTP__LISTEN="127.0.0.1:0", MESHGATE__ADMIN__LISTEN="127.0.0.1:0",
    MESHGATE__LOG__LEVEL="warn")
p = subprocess.Popen(os.environ.get("PREFIX","").split() + [bin_, "run"], env=env, stdout=subprocess.DEVNULL)
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) * 1024
for _ in range(600):
    try: socket.create_connection(("127.0.0.1", port)).close(); break
    except OSError: time.sleep(0.05)
time.sleep(0.5)
def connect_packet(cid):
    c = cid.encode()
    if v5:
        vh = b"\x00\x04MQTT\x05\x02" + (240).to_bytes(2, "big") + b"\x00"
    else:
        vh = b"\x00\x04MQTT\x04\x02" + (240).to_bytes(2, "big")
    body = vh + len(c).to_bytes(2, "big") + c
    return bytes([0x10, len(body)]) + body
before = rss(); conns = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(connect_packet(f"idle-{i}"))
    h = s.recv(2); body = b""
    while len(body) < h[1]: body += s.recv(h[1] - len(body))
    assert body[1] == 0, body
    conns.append(s)
time.sleep(2)
after = rss()
print(f"{(after - before) / n:.0f} bytes/conn ({n}{' v5' if v5 else ''})")
p.terminate(); p.wait()

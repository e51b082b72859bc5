#!/usr/bin/env python3
"""A reference point, not a relay to use: does a relay whose data path
never leaves the kernel serve more keep-alive requests than a user-space one?

It runs, alternating, direct loopback, HAProxy, failover-proxy (hosts file,
one thread) and a minimal relay that accepts in Python, connects upstream, and
puts both sockets in a BPF sockhash whose SK_SKB verdict program redirects
every received skb to the peer socket's egress (Linux "sockmap"). User space
then never touches a byte, but the work does not vanish: the kernel queues
each redirected skb to a worker thread (a kworker wakeup per segment), which
sends it on. The table gives, per keep-alive request, the CPU time of the
relay process and of the kernel's worker threads, so that shows.

Needs root (CAP_BPF and CAP_NET_ADMIN), the tools `benches/run` installs, and
a built release binary:

    benches/run            # once, for the tools and the binary
    python3 benches/kernel_redirect.py

BENCH_RUNS, BENCH_SECONDS and BENCH_BIN work as in bench.py. The relay
forwards by hand what arrived before its sockets joined the map, which is
only safe for a client that waits for a reply (wrk, iperf3): it is a
measuring device.
"""

import ctypes
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

NR_BPF = 321  # x86_64
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8
MAP_SOCKHASH, PROG_SK_SKB, ATTACH_SK_SKB_VERDICT = 18, 14, 38
HELPER_GET_SOCKET_COOKIE, HELPER_SK_REDIRECT_HASH = 46, 72
SO_COOKIE = 57

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 144)
    r = libc.syscall(NR_BPF, cmd, buf, 144)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf command {cmd}: {os.strerror(e)}")
    return r


def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def load_redirect():
    """A sockhash keyed by socket cookie, holding each socket's peer, and the
    verdict program: look up the receiving socket's cookie, redirect there.
    Returns the descriptors of both; the map's is the one to update."""
    map_fd = bpf(BPF_MAP_CREATE, struct.pack("IIIII", MAP_SOCKHASH, 8, 8, 65536, 0))
    prog = b"".join([
        insn(0xBF, 6, 1),                              # r6 = skb
        insn(0x85, imm=HELPER_GET_SOCKET_COOKIE),      # r0 = cookie(skb->sk)
        insn(0x7B, 10, 0, -8),                         # *(u64 *)(fp - 8) = r0
        insn(0xBF, 1, 6),                              # r1 = skb
        insn(0x18, 2, 1, imm=map_fd), insn(0),         # r2 = &map
        insn(0xBF, 3, 10), insn(0x07, 3, imm=-8),      # r3 = fp - 8 (the key)
        insn(0xB7, 4, imm=0),                          # r4 = 0: to the peer's egress
        insn(0x85, imm=HELPER_SK_REDIRECT_HASH),
        insn(0x95),                                    # return
    ])
    code = ctypes.create_string_buffer(prog, len(prog))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("IIQQIIQII16sII", PROG_SK_SKB, len(prog) // 8, ctypes.addressof(code),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0,
                       b"fp_redirect", 0, 0)
    try:
        prog_fd = bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}: {log.value.decode(errors='replace')}") from e
    bpf(BPF_PROG_ATTACH, struct.pack("IIII", map_fd, prog_fd, ATTACH_SK_SKB_VERDICT, 0))
    return map_fd, prog_fd


def relay(listen_port, up_port):
    """The relay process: accept, connect, pair the sockets in the map."""
    map_fd, _prog_fd = load_redirect()
    lock = threading.Lock()
    key, val = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)

    def pair(a, b):
        with lock:
            key.raw = a.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
            val.raw = struct.pack("Q", b.fileno())
            bpf(BPF_MAP_UPDATE_ELEM, struct.pack("IIQQQ", map_fd, 0, ctypes.addressof(key),
                                                  ctypes.addressof(val), 0))

    held = []

    def handle(c):
        try:
            u = socket.create_connection(("127.0.0.1", up_port))
        except OSError:
            c.close()
            return
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            pair(c, u)
            pair(u, c)
        except OSError:
            c.close()  # the client left before it was paired
            u.close()
            return
        # What the client sent before the pairing waits in its socket until
        # more arrives; forward it once by hand. End of stream is not
        # relayed: both sockets stay open until this process ends, which a
        # measuring run of wrk or iperf3 does not mind.
        c.setblocking(False)
        try:
            data = c.recv(65536)
            if data:
                u.sendall(data)
        except BlockingIOError:
            pass
        with lock:
            held.append((c, u))

    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", listen_port))
    ls.listen(4096)
    print("ready", flush=True)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


class KernelRedirect(bench.Mode):
    name = "kernel-redirect"

    def start(self, env, procs):
        self.ports = bench.free_ports(("http", "iperf"))
        self.procs = []
        for svc, up in (("http", env.http_port), ("iperf", env.iperf_port)):
            p = subprocess.Popen([sys.executable, __file__, "--relay", str(self.ports[svc]), str(up)],
                                 stdout=subprocess.PIPE, text=True)
            if p.stdout.readline().strip() != "ready":
                p.kill()
                raise RuntimeError("the sockmap relay did not start (see its error above)")
            self.procs.append(p)
        return self.procs[0].pid, self.ports

    def stop(self, procs):
        for p in self.procs:
            p.kill()
            p.wait()


def kernel_thread_ticks():
    """CPU clock ticks of the kernel's worker threads (kworker, ksoftirqd):
    where work goes that no process does in its own context."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm.startswith(("kworker", "ksoftirqd")):
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def main():
    if os.uname().machine != "x86_64":
        sys.exit(f"the bpf system call number here is x86_64's; this is {os.uname().machine}")
    try:
        for fd in load_redirect():
            os.close(fd)
    except OSError as e:
        sys.exit(f"cannot load the sockmap program (needs root and a kernel with sockmap): {e}")
    bench.OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fp-kredir-"))
    procs = bench.Procs()
    modes = [bench.Direct(), bench.HAProxy(), bench.FailoverProxy("fp-hosts", "hosts", 1), KernelRedirect()]
    res = {m.name: {"gbps": [], "ka_rps": [], "relay_us": [], "kthread_us": []} for m in modes}
    try:
        env = bench.Env(procs, tmp)
        for run in range(bench.RUNS):
            for mode in modes[run % len(modes):] + modes[:run % len(modes)]:
                print(f"run {run + 1}/{bench.RUNS}: {mode.name}", flush=True)
                pid, ports = mode.start(env, procs)
                try:
                    tag = f"{mode.name}-run{run + 1}"
                    res[mode.name]["gbps"].append(bench.iperf(f"{tag}-iperf", ports["iperf"]))
                    k0 = kernel_thread_ticks()
                    ka = bench.wrk(f"{tag}-keepalive", ports["http"], close=False, pid=pid)
                    k1 = kernel_thread_ticks()
                    res[mode.name]["ka_rps"].append(ka["rps"])
                    res[mode.name]["relay_us"].append(ka["cpu_us"])
                    requests = ka["rps"] * bench.SECONDS
                    res[mode.name]["kthread_us"].append((k1 - k0) / os.sysconf("SC_CLK_TCK") * 1e6 / requests)
                finally:
                    mode.stop(procs)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {m: {k: bench.median(v) for k, v in r.items()} for m, r in res.items()}
    (bench.OUT / "kernel_redirect.json").write_text(json.dumps({"raw": res, "median": med}, indent=2))
    ha = med["haproxy"]
    print(f"\n{bench.RUNS} runs of {bench.SECONDS} s, medians; ratio to HAProxy in brackets\n")
    print("| mode | bulk (Gbit/s) | keep-alive requests/s | relay process CPU per request (µs) "
          "| kernel threads CPU per request (µs) |\n|---|---|---|---|---|")
    for m, r in med.items():
        relay_us = "–" if r["relay_us"] is None else f"{r['relay_us']:.1f}"
        print(f"| {m} | {r['gbps']:.2f} ({r['gbps'] / ha['gbps']:.2f}×) | "
              f"{r['ka_rps']:,.0f} ({r['ka_rps'] / ha['ka_rps']:.2f}×) | {relay_us} | {r['kthread_us']:.1f} |")
    print(f"raw outputs: {bench.OUT}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--relay":
        relay(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()

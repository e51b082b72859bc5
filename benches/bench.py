#!/usr/bin/env python3
"""failover-proxy benchmark: direct loopback vs HAProxy and nginx (its
stream module, when installed) vs failover-proxy.

Run through benches/run, which installs the tools and builds the release
binary. Every server is on 127.0.0.x; DNS is a dnsmasq started here on a
loopback port. Measurements run one after another, never two at once; each
repetition rotates the order of the modes, and the table gives medians.

Environment: BENCH_RUNS (repetitions, default 3), BENCH_SECONDS (length of
each load run, default 5), BENCH_IDLE (idle connections, default 1000),
BENCH_CONNS (wrk's connections, default 32: more of them show how much of a
mode's rate is lost to waiting rather than to CPU), BENCH_OUT (folder for raw outputs), BENCH_BIN (the failover-proxy binary,
default target/release/failover-proxy: an unstripped build for perf, or an
older build to compare against).
"""

import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("BENCH_BIN", str(ROOT / "target" / "release" / "failover-proxy")))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
IDLE = int(os.environ.get("BENCH_IDLE", "1000"))
CONNS = int(os.environ.get("BENCH_CONNS", "32"))
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "benches" / "results" / time.strftime("%Y%m%d-%H%M%S")))
ATTEMPT_DELAY_MS = 250
BODY = "x" * 63 + "\n"  # a 64-byte response body

LIVE = "127.0.0.1"
# The first address of each failover alias answers until the failover row
# kills it: then nothing listens on REFUSING, and HOLE's accept queue is
# full, so its SYNs are dropped.
REFUSING = "127.0.0.2"
HOLE = "127.0.0.3"
FIRST = {"refused": REFUSING, "hole": HOLE}


def free_ports(names, host="127.0.0.1"):
    """A distinct free port per name: the probe sockets stay bound until all
    are chosen, so the kernel cannot hand out one port twice (a run failed
    with two routes given the same listen port)."""
    socks = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return {n: s.getsockname()[1] for n, s in zip(names, socks)}
    finally:
        for s in socks:
            s.close()


def wait_port(port, host="127.0.0.1", timeout=10.0):
    """Waits until something accepts on host:port (an event, bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def rss_kib(pid, field="VmRSS"):
    """A memory figure of `pid` from /proc: VmRSS (resident now) or VmHWM
    (the most it has been resident)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


class Procs:
    """Child processes, all stopped at exit."""

    def __init__(self):
        self.procs = []

    def start(self, name, args, **kw):
        log = open(OUT / f"{name}.log", "ab")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p)


class Env:
    """Backends, DNS and the black hole, shared by every mode."""

    def __init__(self, procs, tmp):
        self.procs, self.tmp = procs, tmp
        ports = free_ports(("http", "iperf", "hold"))
        self.http_port, self.iperf_port, self.hold_port = ports["http"], ports["iperf"], ports["hold"]
        conf = tmp / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/cbt; proxy_temp_path {tmp}/pt; fastcgi_temp_path {tmp}/ft;
  uwsgi_temp_path {tmp}/ut; scgi_temp_path {tmp}/st;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_header_timeout 300s;
  server {{
    listen {LIVE}:{self.http_port} backlog=4096;
    location = /64 {{ default_type text/plain; return 200 "{BODY.strip()}\\n"; }}
  }}
  server {{
    listen {LIVE}:{self.hold_port} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
        self.nginx = procs.start("nginx", ["nginx", "-c", str(conf), "-e", str(tmp / "nginx-error.log")])
        self.iperf = procs.start("iperf3-server", ["iperf3", "-s", "-B", LIVE, "-p", str(self.iperf_port)])
        hosts = tmp / "dns.hosts"
        hosts.write_text(f"{LIVE} bench.test\n")
        os.chmod(tmp, 0o755)
        os.chmod(hosts, 0o644)
        # dnsmasq binds TCP and UDP on its port. The port is picked below
        # the ephemeral range: in it, the TIME_WAIT sockets of an earlier
        # new-connection run (or of the test suite) hold ports on 127.0.0.1
        # and made 42 % of dnsmasq starts fail. A failed start retries.
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        for _ in range(20):
            self.dns_port = random.randrange(10000, low)
            self.dnsmasq = procs.start("dnsmasq", [
                "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--log-facility=-",
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--local=/test/", f"--port={self.dns_port}", f"--addn-hosts={hosts}",
                f"--pid-file={tmp}/dnsmasq.pid", "--local-ttl=3600", "--cache-size=1000",
            ])
            if self.wait_dns():
                break
            procs.stop(self.dnsmasq)
        else:
            raise RuntimeError("dnsmasq does not answer")
        # The hosts file failover-proxy reads in "hosts" mode; the failover
        # aliases list the broken address first.
        self.hosts = tmp / "hosts"
        self.hosts.write_text(
            f"{LIVE} bench.test\n"
            f"{REFUSING} refused.test\n{LIVE} refused.test\n"
            f"{HOLE} hole.test\n{LIVE} hole.test\n"
        )
        self.first = {}
        for port in (self.http_port, self.hold_port):
            wait_port(port)
        time.sleep(0.3)  # iperf3 -s has no readiness signal; a probe would occupy it

    def first_answers(self, svc):
        """The first address of `svc`'s alias accepts connections (health
        checks only: no request is sent through it)."""
        self.close(svc)
        self.first[svc] = [socket.create_server((FIRST[svc], self.http_port), backlog=128)]

    def first_dies(self, svc):
        """The first address of `svc`'s alias stops answering: it refuses,
        or (hole) it becomes a listener with backlog 0 and one connection
        parked in its queue, which drops every SYN."""
        self.close(svc)
        if svc == "hole":
            hole = socket.socket()
            hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hole.bind((HOLE, self.http_port))
            hole.listen(0)
            self.first[svc] = [hole, socket.create_connection((HOLE, self.http_port))]

    def close(self, svc=None):
        """Closes the sockets standing for `svc`'s first address, or for
        every alias's."""
        for k in [svc] if svc else list(self.first):
            for s in self.first.pop(k, []):
                s.close()

    def wait_dns(self):
        """True once dnsmasq answers; False if it exited or stayed silent."""
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05bench\x04test\x00\x00\x01\x00\x01"
        deadline = time.monotonic() + 10
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while time.monotonic() < deadline and self.dnsmasq.poll() is None:
                try:
                    s.sendto(q, ("127.0.0.1", self.dns_port))
                    if s.recv(512)[:2] == b"\x12\x34":
                        return True
                except OSError:
                    time.sleep(0.05)
        return False


class Mode:
    name = ""
    threads = 1

    def start(self, env, procs):
        """Starts the proxy; returns (pid or None, {service: port})."""
        raise NotImplementedError

    def stop(self, procs):
        pass


class Proxied(Mode):
    """A mode with a proxy process of its own (`self.proc`) listening on
    `self.ports`."""

    def serving(self, services=None):
        """Waits until the proxy listens (on the ports of `services`, or on
        every port but iperf's) and has served one request, and returns what
        `start` returns. Never the iperf port: iperf3's server takes one
        client at a time and a probe connection there can make the next
        real test fail. The request makes the failover rows'
        "first connection" time a route's first failover, not a process
        waking from idle (about 0.5 ms here for any of the proxies), and
        waits out HAProxy's first DNS answer, which brings the addresses of
        its server templates."""
        for svc in services or [s for s in self.ports if s != "iperf"]:
            wait_port(self.ports[svc])
        wait_http(self.ports["http"])
        return self.proc.pid, self.ports

    def stop(self, procs):
        procs.stop(self.proc)


class Direct(Mode):
    name = "direct"

    def start(self, env, procs):
        return None, {"http": env.http_port, "iperf": env.iperf_port, "hold": env.hold_port}


class HAProxy(Proxied):
    """HAProxy in `mode tcp`. `threads` None leaves `nbthread` out: HAProxy
    2.6 then runs a thread per CPU, its default, to compare with
    failover-proxy's default threading (`fp-dns-mt`, `fp-hosts-mt`); the
    ratios stay to the one-thread column."""

    def __init__(self, name="haproxy", threads=1):
        self.name, self.threads = name, threads

    def start(self, env, procs):
        self.ports = free_ports(("http", "iperf", "hold", "refused", "hole"))
        cfg = env.tmp / "haproxy.cfg"
        timeout_connect = f"{ATTEMPT_DELAY_MS}ms"
        dyn = ""
        for svc, backend_port in (("http", env.http_port), ("iperf", env.iperf_port), ("hold", env.hold_port)):
            dyn += f"""
frontend f_{svc}
  bind 127.0.0.1:{self.ports[svc]}
  default_backend b_{svc}
backend b_{svc}
  balance first
  server-template s 2 bench.test:{backend_port} resolvers dns init-addr none resolve-prefer ipv4
"""
        static = ""
        for svc, bad in (("refused", REFUSING), ("hole", HOLE)):
            static += f"""
frontend f_{svc}
  bind 127.0.0.1:{self.ports[svc]}
  default_backend b_{svc}
backend b_{svc}
  balance first
  option redispatch
  retries 1
  timeout connect {timeout_connect}
  server s1 {bad}:{env.http_port} check inter 1s fall 1 rise 1 observe layer4 error-limit 1 on-error mark-down
  server s2 {LIVE}:{env.http_port} check inter 1s fall 1 rise 1 observe layer4 error-limit 1 on-error mark-down
"""
        threads = f"  nbthread {self.threads}" if self.threads else ""
        cfg.write_text(f"""
global
{threads}
  maxconn 9000
  pidfile {env.tmp}/haproxy.pid
resolvers dns
  nameserver ns1 127.0.0.1:{env.dns_port}
  accepted_payload_size 1232
  hold valid 1s
  timeout resolve 1s
  timeout retry 1s
defaults
  mode tcp
  timeout connect 2s
  timeout client 300s
  timeout server 300s
{dyn}
{static}
""")
        self.proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(cfg)])
        return self.serving()


class Nginx(Proxied):
    """nginx's stream (TCP) proxy: one process, one worker. Like HAProxy, it
    resolves the alias through the same dnsmasq and keeps the answer a
    second (`resolver valid=1s`): a variable in `proxy_pass` makes it
    resolve at run time, not once at start. The failover routes are an
    upstream whose second server is a `backup`, as `balance first` is, with
    a failed connect marking the first down (`max_fails=1`) for
    `fail_timeout`, and `proxy_connect_timeout` at `attempt_delay`."""
    name = "nginx"
    MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

    def start(self, env, procs):
        self.ports = free_ports(("http", "iperf", "hold", "refused", "hole"))
        cfg = env.tmp / "nginx-stream.conf"
        servers = ""
        for svc, backend_port in (("http", env.http_port), ("iperf", env.iperf_port), ("hold", env.hold_port)):
            servers += f"""
  server {{
    listen 127.0.0.1:{self.ports[svc]} backlog=4096;
    set $upstream bench.test:{backend_port};
    proxy_pass $upstream;
  }}"""
        for svc, bad in (("refused", REFUSING), ("hole", HOLE)):
            servers += f"""
  upstream u_{svc} {{
    server {bad}:{env.http_port} max_fails=1 fail_timeout=10s;
    server {LIVE}:{env.http_port} backup;
  }}
  server {{
    listen 127.0.0.1:{self.ports[svc]} backlog=4096;
    proxy_connect_timeout {ATTEMPT_DELAY_MS}ms;
    proxy_pass u_{svc};
  }}"""
        cfg.write_text(f"""
load_module {self.MODULE};
worker_processes 1;
master_process off;
daemon off;
pid {env.tmp}/nginx-stream.pid;
error_log {env.tmp}/nginx-stream-error.log;
worker_rlimit_nofile 40000;
events {{ worker_connections 20000; }}
stream {{
  resolver 127.0.0.1:{env.dns_port} valid=1s ipv6=off;
  resolver_timeout 2s;
  proxy_connect_timeout 2s;
  proxy_timeout 300s;
{servers}
}}
""")
        self.proc = procs.start("nginx-stream", ["nginx", "-c", str(cfg), "-e", str(env.tmp / "nginx-stream-error.log")])
        return self.serving()


class FailoverProxy(Proxied):
    def __init__(self, name, source, threads, relay="splice"):
        self.name, self.source, self.threads, self.relay = name, source, threads, relay

    def config(self, env, ports):
        routes = ""
        services = [("http", "bench.test", env.http_port), ("iperf", "bench.test", env.iperf_port),
                    ("hold", "bench.test", env.hold_port), ("refused", "refused.test", env.http_port),
                    ("hole", "hole.test", env.http_port)]
        for svc, alias, port in services:
            routes += f"""
[[route]]
name = "{svc}"
listen = "127.0.0.1:{ports[svc]}"
alias = "{alias}"
port = {port}
attempt_delay = "{ATTEMPT_DELAY_MS}ms"
connect_timeout = "2s"
max_connections = 30000
"""
        hosts = str(env.hosts) if self.source == "hosts" else ""
        return f"""{routes}
[resolver]
nameservers = ["127.0.0.1:{env.dns_port}"]
hosts_file = "{hosts}"
family = "ipv4"

[health]
interval = "0s"

[admin]
listen = ""

[log]
level = "warn"

[runtime]
worker_threads = {self.threads}
relay = "{self.relay}"
"""

    def start(self, env, procs):
        self.ports = free_ports(("http", "iperf", "hold", "refused", "hole"))
        cfg = env.tmp / f"{self.name}.toml"
        cfg.write_text(self.config(env, self.ports))
        self.proc = procs.start(self.name, [str(BIN), "run", "--config", str(cfg)])
        # Not the failover routes' ports: a probe there would dial their
        # first address before the row times its death.
        return self.serving(("http", "hold"))


def wait_http(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http_get(port, timeout=0.5):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no HTTP answer through port {port}")


def http_get(port, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /64 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.startswith(b"HTTP/1.1 200")


def run_cmd(name, args, timeout):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    with open(OUT / f"{name}.txt", "a") as f:
        f.write(f"$ {' '.join(args)}\n{r.stdout}{r.stderr}\n")
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {r.stderr.strip()[:300]}")
    return r.stdout


def unit_seconds(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        raise ValueError(v)
    x, u = float(m.group(1)), m.group(2)
    return x * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[u]


def cpu_ticks(pid):
    """User and system clock ticks of a process, its ended threads included."""
    if pid is None:
        return None
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def machine_ticks():
    """All CPU ticks of the machine so far, and the idle ones among them
    (idle and iowait), from /proc/stat."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]


def wrk(tag, port, close, pid=None):
    """wrk's figures, the CPU time `pid` spent per request meanwhile (what
    a proxy costs the host for each request it relays), and the share of
    the machine left idle: a mode whose connections wait (for a DNS
    answer, say) leaves the cores idle where a busy one does not."""
    before = cpu_ticks(pid)
    all_before, idle_before = machine_ticks()
    args = ["wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    args.append(f"http://127.0.0.1:{port}/64")
    out = run_cmd(tag, args, SECONDS + 30)
    after = cpu_ticks(pid)
    all_after, idle_after = machine_ticks()
    idle_pct = 100 * (idle_after - idle_before) / max(1, all_after - all_before)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    count = int(re.search(r"(\d+) requests in", out).group(1))
    cpu_us = user_pct = None
    if pid is not None and count:
        user, system = after[0] - before[0], after[1] - before[1]
        cpu_us = (user + system) / os.sysconf("SC_CLK_TCK") * 1e6 / count
        # The share a proxy could save by doing nothing in user space at
        # all: the rest is the kernel's TCP work, which any relay that
        # ends both connections pays.
        user_pct = 100 * user / max(1, user + system)
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {p: unit_seconds(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M)}
    return {"rps": rps, "p50": lat.get("50"), "p99": lat.get("99"), "cpu_us": cpu_us, "user_pct": user_pct, "idle_pct": idle_pct,
            "errors": (errors.group(1) if errors else "") + (f" non2xx={non2xx.group(1)}" if non2xx else "")}


def iperf(tag, port):
    out = run_cmd(tag, ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(SECONDS), "-J"], SECONDS + 30)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def idle_memory(pid, port, env):
    """RSS growth of the proxy per idle connection held through it."""
    if pid is None:
        return None
    base = rss_kib(pid)
    socks = []
    try:
        for _ in range(IDLE):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # Every connection is through to nginx once one request on each has
        # been answered; then they stay idle.
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        for s in socks:
            data = b""
            while b"ok\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("idle connection closed")
                data += chunk
        time.sleep(0.5)  # let the allocator settle; nothing to wait on
        grown = rss_kib(pid) - base
        return grown / IDLE
    finally:
        for s in socks:
            s.close()


def connect_time(port):
    """Seconds from connect to the first response byte of one request."""
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /64 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        if not s.recv(1):
            raise RuntimeError("no response")
    return time.perf_counter() - t


def failover(mode, env, procs, svc):
    """First-connection and median later-connection times after the first
    address of `svc`'s alias dies under a running, warmed-up proxy: what a
    client sees when a server fails, before any health check has run since
    (HAProxy starts its servers up and checks them each second)."""
    if isinstance(mode, Direct):
        first = connect_time(env.http_port)
        later = statistics.median(connect_time(env.http_port) for _ in range(20))
        return first, later
    env.first_answers(svc)
    pid, ports = mode.start(env, procs)
    try:
        env.first_dies(svc)
        first = connect_time(ports[svc])
        later = statistics.median(connect_time(ports[svc]) for _ in range(20))
        return first, later
    finally:
        mode.stop(procs)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: run benches/run, which builds it")
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    procs = Procs()
    modes = [Direct(), HAProxy(), FailoverProxy("fp-hosts", "hosts", 1), FailoverProxy("fp-dns", "dns", 1),
             FailoverProxy("fp-dns-mt", "dns", 0), FailoverProxy("fp-hosts-mt", "hosts", 0),
             HAProxy("haproxy-mt", None),
             FailoverProxy("fp-hosts-copy", "hosts", 1, relay="copy")]
    if Nginx.MODULE.exists():
        modes.append(Nginx())
    else:
        print(f"{Nginx.MODULE} is missing (Debian: libnginx-mod-stream): no nginx column", flush=True)
    results = {m.name: {} for m in modes}

    def rec(mode, key, value):
        results[mode.name].setdefault(key, []).append(value)

    env = None
    try:
        env = Env(procs, tmp)
        for run in range(RUNS):
            order = modes[run % len(modes):] + modes[:run % len(modes)]
            for mode in order:
                print(f"run {run + 1}/{RUNS}: {mode.name}", flush=True)
                pid, ports = mode.start(env, procs)
                try:
                    tag = f"{mode.name}-run{run + 1}"
                    if pid is not None:
                        rec(mode, "start_kib", rss_kib(pid))
                        # Before the load runs: after them, the new
                        # connections would reuse memory that earlier ones
                        # freed (failover-proxy's histogram samples, folded
                        # after each 4,096 a thread records, left room for
                        # them), and the
                        # growth would show that, not what a connection holds.
                        rec(mode, "idle_kib", idle_memory(pid, ports["hold"], env))
                    try:
                        rec(mode, "gbps", iperf(f"{tag}-iperf", ports["iperf"]))
                    except (RuntimeError, KeyError, subprocess.TimeoutExpired) as e:
                        print(f"  iperf3 failed, run not counted: {e}", flush=True)
                    ka = wrk(f"{tag}-keepalive", ports["http"], close=False, pid=pid)
                    rec(mode, "ka_rps", ka["rps"])
                    rec(mode, "ka_p50", ka["p50"])
                    rec(mode, "ka_p99", ka["p99"])
                    rec(mode, "ka_cpu_us", ka["cpu_us"])
                    rec(mode, "ka_user", ka["user_pct"])
                    rec(mode, "ka_idle", ka["idle_pct"])
                    nc = wrk(f"{tag}-newconn", ports["http"], close=True, pid=pid)
                    rec(mode, "nc_rps", nc["rps"])
                    rec(mode, "nc_cpu_us", nc["cpu_us"])
                    rec(mode, "nc_user", nc["user_pct"])
                    rec(mode, "nc_idle", nc["idle_pct"])
                    if ka["errors"].strip() or nc["errors"].strip():
                        print(f"  wrk errors: keepalive {ka['errors']!r} newconn {nc['errors']!r}", flush=True)
                    if pid is not None:
                        rec(mode, "peak_kib", rss_kib(pid, "VmHWM"))
                finally:
                    mode.stop(procs)
                # Threads, relay and resolution source do not change how a
                # proxy fails over: one column of each proxy is enough.
                if mode.name in ("direct", "haproxy", "fp-hosts", "nginx"):
                    for svc in ("refused", "hole"):
                        first, later = failover(mode, env, procs, svc)
                        rec(mode, f"{svc}_first_ms", first * 1000)
                        rec(mode, f"{svc}_later_ms", later * 1000)
    finally:
        procs.stop_all()
        if env is not None:
            env.close()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {m: {k: median(v) for k, v in r.items()} for m, r in results.items()}
    (OUT / "results.json").write_text(json.dumps({"raw": results, "median": med}, indent=2))
    table = render(med)
    (OUT / "table.md").write_text(table)
    print()
    print(table)
    print(f"raw outputs: {OUT}")


ROWS = [
    ("gbps", "bulk throughput, 1 stream (Gbit/s)", "{:.2f}", True),
    ("ka_rps", f"keep-alive requests/s ({CONNS} conns)", "{:,.0f}", True),
    ("ka_p50", "keep-alive p50 latency (µs)", "{:,.0f}", False),
    ("ka_p99", "keep-alive p99 latency (µs)", "{:,.0f}", False),
    ("nc_rps", f"new connections/s (Connection: close, {CONNS} conns)", "{:,.0f}", True),
    ("ka_cpu_us", "proxy CPU per keep-alive request (µs)", "{:.1f}", False),
    ("nc_cpu_us", "proxy CPU per new connection (µs)", "{:.1f}", False),
    ("ka_user", "proxy CPU in user space, keep-alive (%)", "{:.1f}", None),
    ("nc_user", "proxy CPU in user space, new connections (%)", "{:.1f}", None),
    ("ka_idle", "machine idle during the keep-alive run (%)", "{:.1f}", None),
    ("nc_idle", "machine idle during the new-connection run (%)", "{:.1f}", None),
    ("idle_kib", f"memory per idle connection (KiB, {IDLE} held before the load runs)", "{:.2f}", False),
    ("start_kib", "proxy memory at start (RSS, KiB)", "{:,.0f}", False),
    ("peak_kib", "proxy peak memory over the run (VmHWM, KiB)", "{:,.0f}", False),
    ("refused_first_ms", "first address refuses: first connection (ms)", "{:.2f}", False),
    ("refused_later_ms", "first address refuses: later connections (ms)", "{:.2f}", False),
    ("hole_first_ms", "first address black-holed: first connection (ms)", "{:.2f}", False),
    ("hole_later_ms", "first address black-holed: later connections (ms)", "{:.2f}", False),
]


def ratio(v, base):
    """`v / base` to two decimals, or to two significant digits when it is
    below 0.01 (a failover hundreds of times faster must not show as 0)."""
    if not base:
        return "–"
    x = v / base
    return f"{x:.2g}×" if x < 0.01 else f"{x:,.2f}×"


def congestion_control():
    """The host's TCP congestion control: it sets the bulk row's scale. On
    loopback, BBR paces every sender (the proxies' upstream sockets too)
    and caps each hop near the same rate, so the proxies' bulk figures
    meet; with cubic they spread by how much each proxy's copy costs."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError as e:
        return f"unknown ({e.strerror})"


def render(med):
    cols = list(med)
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}, "
        f"TCP congestion control {congestion_control()}; "
        f"{time.strftime('%Y-%m-%d')}; {RUNS} runs of {SECONDS} s, medians. "
        "Ratios: to direct / to HAProxy (above 1 is better for rates, below 1 for times and memory).",
        "",
        "| measure | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for key, label, fmt, higher in ROWS:
        cells = []
        for c in cols:
            v = med[c].get(key)
            if v is None:
                cells.append("–")
                continue
            shown = v * 1e6 if key in ("ka_p50", "ka_p99") else v
            cell = fmt.format(shown)
            # A share of the machine is read as it is, not as a ratio.
            if c not in ("direct", "haproxy") and higher is not None:
                d, h = med["direct"].get(key), med["haproxy"].get(key)
                r = [ratio(v, d), ratio(v, h)]
                cell += f" ({' / '.join(r)})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

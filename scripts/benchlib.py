"""What the Python benchmark scripts share: free ports, calls to a node's
internal listener, starting a node and waiting until it is ready, its RSS."""
import http.client, os, re, socket, subprocess, sys, time


def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p


def call(port, method, path, body=None, token='t', timeout=60, headers=None):
    """One HTTP request to 127.0.0.1:`port`: (status, body bytes)."""
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    c.request(method, path, body=body, headers={'Authorization': f'Bearer {token}', **(headers or {})})
    r = c.getresponse(); data = r.read(); c.close()
    return r.status, data


def start_node(binary, config, internal, patience=120, label='the node'):
    """Starts `binary serve --config config` and waits until its `/readyz`
    on `internal` answers 200: (process, seconds it took)."""
    began = time.monotonic()
    node = subprocess.Popen([binary, 'serve', '--config', config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            if call(internal, 'GET', '/readyz', timeout=5)[0] == 200:
                return node, time.monotonic() - began
        except OSError:
            pass
        if time.monotonic() - began > patience:
            node.kill(); sys.exit(f'{label} did not become ready in {patience} s')
        time.sleep(0.01)


def stop(node):
    node.terminate(); node.wait(timeout=60)


def rss_kib(pid):
    with open(f'/proc/{pid}/status') as status:
        return int(re.search(r'VmRSS:\s+(\d+)', status.read()).group(1))


def cpu_seconds(pid):
    """User + system CPU time the process `pid` spent, in seconds."""
    with open(f'/proc/{pid}/stat') as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def tenant_metric(port, name, tenant):
    """The value of metric `name` for `tenant` in the node's exposition."""
    _, body = call(port, 'GET', '/metrics')
    for line in body.decode().splitlines():
        if line.startswith(name + '{') and f'tenant="{tenant}"' in line:
            return float(line.rsplit(' ', 1)[1])
    return 0.0


def wait(what, condition, patience=300):
    """Polls `condition` until it holds; exits naming `what` past `patience` s."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > patience:
            sys.exit(f'{what}: not in {patience} s')
        time.sleep(0.02)


def open_client(port, transport, path_and_query):
    """A raw client of 127.0.0.1:`port` whose handshake was answered:
    `websocket` (101) or `eventstream` (200 and its hello event)."""
    s = socket.create_connection(('127.0.0.1', port))
    if transport == 'websocket':
        s.sendall((f'GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n'
                   'Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n'
                   'Sec-WebSocket-Version: 13\r\n\r\n').encode())
        expected, until = b'HTTP/1.1 101', b'\r\n\r\n'
    else:
        s.sendall(f'GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n'.encode())
        expected, until = b'HTTP/1.1 200', b'"type":"hello"}\n\n'
    head = read_until(s, until, transport)
    if not head.startswith(expected):
        sys.exit(f'{transport}: refused: {head[:120]!r}')
    return s


def rss_once_registered(node, internal, tenant, n):
    """The node's RSS (KiB) once `n` clients of `tenant` are registered and
    two seconds more have passed (what their handshakes left is freed)."""
    wait('every client registered', lambda: tenant_metric(internal, 'pushgate_connections', tenant) == n)
    time.sleep(2)
    return rss_kib(node.pid)


def read_until(s, marker, what):
    """What socket `s` sends until `marker` has come; exits naming `what`
    if it closes first."""
    seen = b''
    while marker not in seen:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f'{what}: closed: {seen[:160]!r}')
        seen += chunk
    return seen


def bench_config(public, internal, tenants):
    """A node's configuration file for a benchmark: both listeners on
    loopback, no per-address limit, warnings only, a fresh state
    directory, and `tenants` (TOML). Its path; the caller removes it."""
    import tempfile
    config = tempfile.NamedTemporaryFile('w', suffix='.toml', delete=False)
    config.write(f'[listen]\npublic = "127.0.0.1:{public}"\ninternal = "127.0.0.1:{internal}"\n'
                 '[websocket]\nmax_connections_per_ip = 1000000\n[log]\nfilter = "warn"\n'
                 f'[state]\ndir = "{tempfile.mkdtemp()}"\n' + tenants)
    config.close()
    return config.name

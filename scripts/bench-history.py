"""Memory of the history each node keeps for clients that resume: starts a
release node whose tenants keep up to 10,000 messages each, pushes
`count` messages (batches of 100, data of `size` bytes, to users nobody
connected as: no delivery cost mixed in) spread over 10 tenants, and
reports the growth of the node's RSS per kept message next to what the
`pushgate_history_bytes` gauge counts. Three rounds; medians.

Usage: scripts/bench-history.py target/release/pushgate [count] [size]"""
import http.client, json, os, re, statistics, sys, tempfile, time

from benchlib import free_port, rss_kib, start_node

binary = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
size = int(sys.argv[3]) if len(sys.argv) > 3 else 100
tenants = 10

def round_():
    work = tempfile.mkdtemp()
    public, internal = free_port(), free_port()
    config = f'[listen]\npublic = "127.0.0.1:{public}"\ninternal = "127.0.0.1:{internal}"\n[log]\nfilter = "warn"\n'
    for t in range(tenants):
        config += (f'[tenants.t{t}]\npush_keys = ["k{t}"]\nauth = "development"\n'
                   f'[tenants.t{t}.history]\nmax_messages = 10000\nmax_bytes = 1073741824\nmax_age = "1h"\n')
    open(f'{work}/p.toml', 'w').write(config)
    node, _ = start_node(binary, f'{work}/p.toml', internal)
    try:
        conn = http.client.HTTPConnection('127.0.0.1', internal)
        def push_batches(n, tag):
            data = 'x' * (size - 2)
            for b in range(n // 100):
                t = b % tenants
                body = json.dumps({'messages': [{'users': [f'nobody-{tag}'], 'data': data}] * 100})
                conn.request('POST', '/v1/push/batch', body, {'Authorization': f'Bearer k{t}', 'Content-Type': 'application/json'})
                r = conn.getresponse(); r.read()
                assert r.status == 202, r.status
        # Warm up allocator and maps with one round, then measure the growth.
        push_batches(tenants * 100, 'warm')
        time.sleep(0.5)
        before = rss_kib(node.pid)
        push_batches(count, 'measured')
        time.sleep(0.5)
        after = rss_kib(node.pid)
        conn.request('GET', '/metrics'); metrics = conn.getresponse().read().decode()
        kept = sum(float(v) for v in re.findall(r'^pushgate_history_messages\{[^}]*\} (\S+)', metrics, re.M))
        counted = sum(float(v) for v in re.findall(r'^pushgate_history_bytes\{[^}]*\} (\S+)', metrics, re.M))
        return (after - before) * 1024 / count, counted / kept, kept
    finally:
        node.terminate(); node.wait()

rounds = [round_() for _ in range(3)]
rss = statistics.median(r[0] for r in rounds)
gauge = statistics.median(r[1] for r in rounds)
print(f'{count} messages of {size} bytes kept ({int(rounds[0][2])} in the history):')
print(f'  RSS growth per kept message: {rss:.0f} B (rounds: {", ".join(f"{r[0]:.0f}" for r in rounds)})')
print(f'  pushgate_history_bytes per kept message: {gauge:.0f} B')

"""Median latency of sequential pushes (one keep-alive connection, 3000
pushes, the first 500 dropped) through the push API of a release node,
for a tenant with an on-publish plugin (keyword_filter) and one without,
twice each, alternating.

Usage: scripts/bench-publish-hook.py target/release/pushgate
(after `cargo build --release` and scripts/bench-plugins.sh, which builds
the plugins)."""
import http.client, json, os, sys, tempfile, time, statistics

from benchlib import free_port, start_node

binary = sys.argv[1]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
wasm = open(os.path.join(root, 'plugins/target/wasm32-wasip2/release/keyword_filter.wasm'), 'rb').read()
work = tempfile.mkdtemp()
public, internal = free_port(), free_port()
config = f'''
[listen]
public = "127.0.0.1:{public}"
internal = "127.0.0.1:{internal}"
[admin]
token = "t"
[state]
dir = "{work}/state"
[log]
filter = "warn"
[tenants.filtered]
push_keys = ["filtered-key"]
auth = "development"
[tenants.filtered.plugin.config]
words = "spoiler"
[tenants.plain]
push_keys = ["plain-key"]
auth = "development"
'''
open(f'{work}/p.toml', 'w').write(config)
node, _ = start_node(binary, f'{work}/p.toml', internal)
try:
    c = http.client.HTTPConnection('127.0.0.1', internal, timeout=5)
    c.request('POST', '/admin/v1/tenants/filtered/plugins', body=wasm, headers={'Authorization': 'Bearer t'})
    r = c.getresponse(); r.read(); assert r.status == 201, r.status
    body = json.dumps({"users": ["nobody"], "data": {"text": "a message of about a hundred bytes, as a push typically carries"}})
    for tenant in ['plain', 'filtered', 'plain', 'filtered']:
        c = http.client.HTTPConnection('127.0.0.1', internal, timeout=5)
        times = []
        for i in range(3000):
            t = time.perf_counter()
            c.request('POST', '/v1/push', body=body, headers={'Authorization': f'Bearer {tenant}-key', 'Content-Type': 'application/json'})
            r = c.getresponse(); r.read()
            times.append(time.perf_counter() - t)
            assert r.status == 202, r.status
        times = times[500:]
        print(f'{tenant}: median {statistics.median(times)*1e6:.0f} us, p99 {sorted(times)[int(len(times)*0.99)]*1e6:.0f} us')
finally:
    node.kill(); node.wait()

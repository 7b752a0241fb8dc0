"""How long a node with many tenants and plugin versions takes to start,
and what one admin change costs at that size.

Makes TENANTS tenants through the admin API of a release node (their
median and p99 answer time is the cost of one change, state written to
disk before the answer), uploads VERSIONS distinct plugin versions (10
per tenant: keyword_filter with a custom section of its own, so each is
compiled on its own), then restarts the node three times and prints the
time from start to `/readyz` 200 each time: with the compiled-plugin
cache, without it (`compiled/` removed), and with it again.

Usage: scripts/bench-start.py target/release/pushgate [TENANTS] [VERSIONS]
(after `cargo build --release` and `cargo build --manifest-path
plugins/Cargo.toml --target wasm32-wasip2 --release`)."""
import json, os, shutil, statistics, sys, tempfile, time

import benchlib
from benchlib import free_port, stop

binary = sys.argv[1]
tenants = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
versions = int(sys.argv[3]) if len(sys.argv) > 3 else 100
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
wasm = open(os.path.join(root, 'plugins/target/wasm32-wasip2/release/keyword_filter.wasm'), 'rb').read()
work = tempfile.mkdtemp()


def leb(n):
    out = bytearray()
    while True:
        byte = n & 0x7f; n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def distinct(i):
    """The component with a custom section naming `i` appended."""
    name = f'pushgate-bench-{i}'.encode()
    payload = leb(len(name)) + name
    return wasm + b'\x00' + leb(len(payload)) + payload


internal = free_port()
open(f'{work}/p.toml', 'w').write(f'''
[listen]
public = "127.0.0.1:{free_port()}"
internal = "127.0.0.1:{internal}"
[admin]
token = "t"
[state]
dir = "{work}/state"
[log]
filter = "warn"
''')


def call(method, path, body=None):
    return benchlib.call(internal, method, path, body, timeout=120)


def start():
    return benchlib.start_node(binary, f'{work}/p.toml', internal, patience=300)


node, _ = start()
try:
    took = []
    for i in range(tenants):
        body = json.dumps({'push_keys': [f'key-{i}'], 'auth': 'development'}).encode()
        began = time.monotonic()
        status, data = call('PUT', f'/admin/v1/tenants/t{i}', body)
        took.append(time.monotonic() - began)
        assert status == 201, data
    took.sort()
    print(f'{tenants} tenants made: one change median {statistics.median(took) * 1000:.1f} ms, '
          f'p99 {took[int(len(took) * 0.99)] * 1000:.1f} ms (the last 100: median '
          f'{statistics.median(sorted(took[-100:])) * 1000:.1f} ms)')
    for i in range(versions):
        status, data = call('POST', f'/admin/v1/tenants/t{i // 10}/plugins?activate={str(i % 10 == 9).lower()}', distinct(i))
        assert status == 201, data
    print(f'{versions} plugin versions uploaded')
finally:
    stop(node)

for label in ['with the compiled-plugin cache', 'without it (compiled/ removed)', 'with it again']:
    if label.startswith('without'):
        shutil.rmtree(f'{work}/state/compiled', ignore_errors=True)
    node, ready = start()
    stop(node)
    print(f'start to ready, {label}: {ready:.2f} s')
shutil.rmtree(work)

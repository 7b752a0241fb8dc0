"""What one admin change costs end to end on three release nodes through a
real RocketMQ broker: the time until the node that took the call answers
(the change went through the broker and was applied there, on disk), and
until every node serves it (polled every millisecond through each node's
admin API). Also a fourth node started afterwards with an empty state
directory: the time until it is ready, having read every change again.

Usage: scripts/bench-control.py target/release/pushgate [CHANGES]
(after `cargo build --release` and `scripts/rocketmq.sh install`; starts
and stops its own broker with scripts/rocketmq.sh)."""
import json, os, shutil, statistics, subprocess, sys, tempfile, time

from benchlib import call, free_port, start_node

binary = sys.argv[1]
changes = int(sys.argv[2]) if len(sys.argv) > 2 else 200
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
work = tempfile.mkdtemp()
broker_dir = f'{work}/rocketmq'
topic = f'bench_control_{os.getpid()}'


def start(name):
    port = free_port()
    os.makedirs(f'{work}/{name}', exist_ok=True)
    open(f'{work}/{name}/p.toml', 'w').write(f'''
[listen]
public = "127.0.0.1:{free_port()}"
internal = "127.0.0.1:{port}"
[admin]
token = "t"
[state]
dir = "{work}/{name}/state"
[log]
filter = "warn"
[bus]
engine = "rocketmq"
[bus.rocketmq]
name_servers = ["127.0.0.1:9876"]
topic = "{topic}"
instance_name = "{name}"
''')
    node, took = start_node(binary, f'{work}/{name}/p.toml', port, label=f'node {name}')
    return node, port, took


subprocess.run(['bash', f'{root}/scripts/rocketmq.sh', 'start', broker_dir], check=True,
               stdout=subprocess.DEVNULL)
nodes = []
try:
    for name in ['a', 'b', 'c']:
        node, port, _ = start(name)
        nodes.append((node, port))
    ports = [port for _, port in nodes]
    answered, everywhere = [], []
    for i in range(changes):
        body = json.dumps({'push_keys': [f'key-{i}'], 'auth': 'development'}).encode()
        began = time.monotonic()
        status, data = call(ports[0], 'PUT', f'/admin/v1/tenants/t{i}', body)
        assert status == 201, data
        answered.append(time.monotonic() - began)
        pending = set(ports[1:])
        while pending:
            for port in list(pending):
                if call(port, 'GET', f'/admin/v1/tenants/t{i}')[0] == 200:
                    pending.discard(port)
            if pending:
                time.sleep(0.001)
        everywhere.append(time.monotonic() - began)
    for label, values in [('answered by the node that took it', answered),
                          ('served by every node', everywhere)]:
        values.sort()
        print(f'{changes} changes, {label}: median {statistics.median(values) * 1000:.1f} ms, '
              f'p90 {values[int(len(values) * 0.9)] * 1000:.1f} ms')
    node, port, ready = start('d')
    nodes.append((node, port))
    status, data = call(port, 'GET', '/admin/v1/tenants')
    known = len(json.loads(data)['tenants'])
    print(f'a fourth node with an empty state directory: ready in {ready:.2f} s, '
          f'serving {known} tenants')
finally:
    for node, _ in nodes:
        node.terminate(); node.wait(timeout=60)
    subprocess.run(['bash', f'{root}/scripts/rocketmq.sh', 'stop', broker_dir],
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(work, ignore_errors=True)

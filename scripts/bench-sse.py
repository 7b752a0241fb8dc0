#!/usr/bin/env python3
"""A Server-Sent Events client beside a WebSocket client: memory per idle
client and node CPU per delivered message.

For each transport a fresh release node: its RSS once ready, then with N
idle clients (each a user of its own, handshakes raw over loopback), then
the node's CPU time for B broadcasts delivered to all of them, until two
seconds after the last was queued (the clients do not read: each socket's
buffer takes the frames). Prints both and one
JSON line.

    scripts/bench-sse.py [N=5000] [B=20]
"""
import json, os, resource, sys, time

sys.path.insert(0, os.path.dirname(__file__))
import benchlib

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
B = int(sys.argv[2]) if len(sys.argv) > 2 else 20
BINARY = os.path.join(os.path.dirname(__file__), '..', 'target', 'release', 'pushgate')


def run(transport):
    public, internal = benchlib.free_port(), benchlib.free_port()
    config = benchlib.bench_config(public, internal, '[tenants.bench]\npush_keys = ["k"]\nauth = "development"\n')
    node, _ = benchlib.start_node(BINARY, config, internal)
    try:
        before = benchlib.rss_kib(node.pid)
        path = '/ws/bench' if transport == 'websocket' else '/sse/bench'
        clients = [benchlib.open_client(public, transport, f'{path}?user=u{i}') for i in range(N)]
        held = benchlib.rss_once_registered(node, internal, 'bench', N)
        delivered = benchlib.tenant_metric(internal, 'pushgate_messages_delivered_total', 'bench')
        cpu = benchlib.cpu_seconds(node.pid)
        for b in range(B):
            status, _ = benchlib.call(internal, 'POST', '/v1/push', token='k',
                                      body=json.dumps({'broadcast': True, 'data': {'n': b, 'text': 'x' * 64}}))
            assert status == 202, status
        benchlib.wait('every broadcast delivered',
             lambda: benchlib.tenant_metric(internal, 'pushgate_messages_delivered_total', 'bench') >= delivered + B * N)
        # Counted once queued: an event stream's task (and a WebSocket's
        # task for what a socket did not take) writes after; the node is
        # otherwise idle, so two seconds more take in its writes.
        time.sleep(2)
        cpu = benchlib.cpu_seconds(node.pid) - cpu
        for s in clients:
            s.close()
    finally:
        benchlib.stop(node)
        os.unlink(config)
    return {'rss_kib_per_client': round((held - before) / N, 2),
            'cpu_us_per_delivery': round(cpu / (B * N) * 1e6, 2)}


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {t: run(t) for t in ('websocket', 'eventstream')}
    for transport, figures in results.items():
        print(f'{transport:12} {figures["rss_kib_per_client"]:6.2f} KiB per idle client, '
              f'{figures["cpu_us_per_delivery"]:5.2f} µs node CPU per delivered message')
    print(json.dumps({'clients': N, 'broadcasts': B, **results}))


main()

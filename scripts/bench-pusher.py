#!/usr/bin/env python3
"""A Pusher client (protocol 7, `/app/{key}`) beside a native WebSocket
client: memory per idle client and node CPU per delivered message.

For each protocol a fresh release node: its RSS once ready, then with N
idle clients subscribed to one channel (handshakes and subscriptions raw
over loopback), then the node's CPU time for B pushes to that channel
delivered to all of them (the same `/v1/push` for both: what differs is
delivery), until the node's CPU stands still (the clients do not read
meanwhile: each socket's buffer takes the frames; then every client reads
and must have all B). Then the node's CPU per message published with no
subscriber, GAP = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
P = 2000 requests: `/v1/push`, or the Pusher API's signed
`POST /apps/1/events`. Prints both and one JSON line.

    scripts/bench-pusher.py [N=5000] [B=20] [GAP=0]

GAP seconds between two pushes: 0 is a burst (tasks that lag find several
events waiting and write them at once); 0.2 lets each push reach every
client before the next.
"""
import hashlib, hmac, json, os, resource, socket, sys, time

sys.path.insert(0, os.path.dirname(__file__))
import benchlib

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
B = int(sys.argv[2]) if len(sys.argv) > 2 else 20
GAP = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
P = 2000
BINARY = os.path.join(os.path.dirname(__file__), '..', 'target', 'release', 'pushgate')


def masked_text(payload):
    """A client's text frame (masked, as RFC 6455 asks of clients)."""
    data = payload.encode()
    mask = os.urandom(4)
    head = bytes([0x81])
    if len(data) < 126:
        head += bytes([0x80 | len(data)])
    else:
        head += bytes([0x80 | 126]) + len(data).to_bytes(2, 'big')
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def open_pusher(port, key, channel):
    """A raw Pusher client, connected and subscribed to `channel`."""
    s = socket.create_connection(('127.0.0.1', port))
    s.sendall((f'GET /app/{key}?protocol=7&client=js&version=8.6.0 HTTP/1.1\r\nHost: 127.0.0.1\r\n'
               'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n'
               'Sec-WebSocket-Version: 13\r\n\r\n').encode())
    benchlib.read_until(s, b'connection_established', 'pusher handshake')
    s.sendall(masked_text(json.dumps({'event': 'pusher:subscribe', 'data': {'channel': channel}})))
    benchlib.read_until(s, b'subscription_succeeded', 'pusher subscription')
    return s


def signed_path(path, body):
    """`path` with Pusher's request signature (app `bench-key`/`s`)."""
    params = {'auth_key': 'bench-key', 'auth_timestamp': str(int(time.time())), 'auth_version': '1.0',
              'body_md5': hashlib.md5(body.encode()).hexdigest()}
    query = '&'.join(f'{k}={params[k]}' for k in sorted(params))
    signature = hmac.new(b's', f'POST\n{path}\n{query}'.encode(), hashlib.sha256).hexdigest()
    return f'{path}?{query}&auth_signature={signature}'


def publishing(internal, node, protocol):
    """Node CPU per message published (no subscriber): P pushes through
    `/v1/push`, or P events through the Pusher API, one request each."""
    cpu = benchlib.cpu_seconds(node.pid)
    for i in range(P):
        if protocol == 'native':
            body = json.dumps({'topic': 'nobody', 'event': 'item', 'data': {'n': i}})
            status, _ = benchlib.call(internal, 'POST', '/v1/push', token='k', body=body)
        else:
            body = json.dumps({'name': 'item', 'channels': ['nobody'], 'data': json.dumps({'n': i})})
            status, _ = benchlib.call(internal, 'POST', signed_path('/apps/1/events', body), body=body,
                                      headers={'content-type': 'application/json'})
        assert status in (200, 202), status
    return round((benchlib.cpu_seconds(node.pid) - cpu) / P * 1e6, 1)


def run(protocol):
    public, internal = benchlib.free_port(), benchlib.free_port()
    config = benchlib.bench_config(public, internal, '[tenants.bench]\npush_keys = ["k"]\nauth = "development"\n'
                                        '[tenants.bench.pusher]\napp_id = "1"\nkey = "bench-key"\nsecret = "s"\n')
    node, _ = benchlib.start_node(BINARY, config, internal)
    try:
        before = benchlib.rss_kib(node.pid)
        if protocol == 'native':
            clients = [benchlib.open_client(public, 'websocket', f'/ws/bench?user=u{i}&topics=news')
                       for i in range(N)]
        else:
            clients = [open_pusher(public, 'bench-key', 'news') for _ in range(N)]
        held = benchlib.rss_once_registered(node, internal, 'bench', N)
        delivered = benchlib.tenant_metric(internal, 'pushgate_messages_delivered_total', 'bench')
        cpu = benchlib.cpu_seconds(node.pid)
        for b in range(B):
            status, _ = benchlib.call(internal, 'POST', '/v1/push', token='k',
                                      body=json.dumps({'topic': 'news', 'event': 'item',
                                                       'data': {'n': b, 'text': 'x' * 64}}))
            assert status == 202, status
            time.sleep(GAP)
        benchlib.wait('every push delivered',
             lambda: benchlib.tenant_metric(internal, 'pushgate_messages_delivered_total', 'bench') >= delivered + B * N)
        # Counted once queued: a Pusher connection's task writes each
        # event after. Until the node's CPU time stands still for a
        # second (it is otherwise idle), then every client read back.
        last = benchlib.cpu_seconds(node.pid)
        while True:
            time.sleep(1)
            now = benchlib.cpu_seconds(node.pid)
            if now - last < 0.02:
                break
            last = now
        cpu = now - cpu
        marker = b'"type":"message"' if protocol == 'native' else b'"event":"item"'
        for s in clients:
            got = b''
            s.settimeout(5)
            while got.count(marker) < B:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            assert got.count(marker) == B, f'a client got {got.count(marker)} of {B}'
        for s in clients:
            s.close()
        published = publishing(internal, node, protocol)
    finally:
        benchlib.stop(node)
        os.unlink(config)
    return {'rss_kib_per_client': round((held - before) / N, 2),
            'cpu_us_per_delivery': round(cpu / (B * N) * 1e6, 2),
            'cpu_us_per_published': published}


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {p: run(p) for p in ('native', 'pusher')}
    for protocol, figures in results.items():
        print(f'{protocol:7} {figures["rss_kib_per_client"]:6.2f} KiB per idle client, '
              f'{figures["cpu_us_per_delivery"]:5.2f} µs node CPU per delivered message, '
              f'{figures["cpu_us_per_published"]:6.1f} µs per message published (one request each)')
    print(json.dumps({'clients': N, 'pushes': B, 'gap_s': GAP, **results}))


main()

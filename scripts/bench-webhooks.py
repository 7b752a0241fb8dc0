#!/usr/bin/env python3
"""What lifecycle webhooks cost a node per connection event.

Starts a release node twice — its tenant without webhooks, then with all
six events sent to a local receiver — and in each, for several rounds,
opens N WebSocket connections (each a user of its own) and closes them:
four events a connection (connected, user_online, disconnected,
user_offline). Measures the node's CPU time (user + system, from /proc)
per round, waiting until every connection is gone and, with webhooks,
until the receiver has every event. Prints the medians and the
difference per event, then one JSON line.

    scripts/bench-webhooks.py [N=2000] [ROUNDS=5]
"""
import http.server, json, os, resource, statistics, sys, tempfile, threading

sys.path.insert(0, os.path.dirname(__file__))
import benchlib

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
BINARY = os.path.join(os.path.dirname(__file__), '..', 'target', 'release', 'pushgate')
EVENTS = ['connected', 'disconnected', 'subscribed', 'unsubscribed', 'user_online', 'user_offline']


class Receiver(http.server.BaseHTTPRequestHandler):
    events = 0
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        with Receiver.lock:
            Receiver.events += len(json.loads(body)['events'])
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def connections(internal):
    return benchlib.tenant_metric(internal, 'pushgate_connections', 'bench')


def run(webhooks, receiver_port):
    public, internal = benchlib.free_port(), benchlib.free_port()
    hooks = ''
    if webhooks:
        hooks = (f'[tenants.bench.webhooks]\nurl = "http://127.0.0.1:{receiver_port}/"\n'
                 f'secret = "s"\nevents = {json.dumps(EVENTS)}\nmax_queue = 100000\n')
    config = tempfile.NamedTemporaryFile('w', suffix='.toml', delete=False)
    config.write(f'[listen]\npublic = "127.0.0.1:{public}"\ninternal = "127.0.0.1:{internal}"\n'
                 f'[websocket]\nmax_connections_per_ip = 1000000\n[log]\nfilter = "warn"\n'
                 f'[state]\ndir = "{tempfile.mkdtemp()}"\n'
                 f'[tenants.bench]\npush_keys = ["k"]\nauth = "development"\n'
                 f'max_connections_per_user = 1\n{hooks}')
    config.close()
    node, _ = benchlib.start_node(BINARY, config.name, internal)
    per_round = []
    try:
        for round_no in range(ROUNDS):
            Receiver.events = 0
            before = benchlib.cpu_seconds(node.pid)
            clients = [benchlib.open_client(public, 'websocket', f'/ws/bench?user=r{round_no}-u{i}')
                       for i in range(N)]
            for s in clients:
                s.close()
            benchlib.wait('every connection gone', lambda: connections(internal) == 0)
            if webhooks:
                benchlib.wait('every event received', lambda: Receiver.events >= 4 * N)
            per_round.append((benchlib.cpu_seconds(node.pid) - before) / N * 1e6)
    finally:
        benchlib.stop(node)
        os.unlink(config.name)
    return per_round


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    off = run(False, None)
    on = run(True, server.server_address[1])
    server.shutdown()
    off_median, on_median = statistics.median(off), statistics.median(on)
    per_event = (on_median - off_median) / 4
    print(f'node CPU per connection opened and closed, median of {ROUNDS} rounds of {N}:')
    print(f'  without webhooks {off_median:.1f} µs   with (4 events each) {on_median:.1f} µs')
    print(f'  webhooks: {per_event:.1f} µs of node CPU per event')
    print(json.dumps({'connections': N, 'rounds': ROUNDS, 'off_us': off, 'on_us': on,
                      'off_median_us': round(off_median, 1), 'on_median_us': round(on_median, 1),
                      'per_event_us': round(per_event, 1)}))


main()

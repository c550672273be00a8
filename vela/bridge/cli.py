"""vela-bridge: command line.

    vela-bridge run --cache shop --listen tcp://10.0.0.5:7700 --join tcp://10.0.0.6:7700 \\
                    --secret-file /etc/vela/secret
    vela-bridge run --config /etc/vela/bridge.toml
    vela-bridge secret > /etc/vela/secret      # a new shared secret for the cluster
    vela-bridge keygen > /etc/vela/curve       # a CURVE key pair: encrypted links
    vela-bridge status --cache shop            # members, lag, counters (JSON)
"""

import argparse
import json
import logging
import secrets
import sys

_DEFAULTS = {"heartbeat": 1.0, "failure_timeout": 5.0, "tombstone_ttl": 300.0, "backups": 0}


def _parser():
    p = argparse.ArgumentParser(prog="vela-bridge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the bridge of this host (the default command)")
    run.add_argument("--config", help="a TOML file with any of the options below (flags win)")
    run.add_argument("--cache", action="append", default=None,
                     help="a replicated or partitioned cache this bridge carries (repeat for several)")
    run.add_argument("--listen", help="where peers reach this bridge, e.g. tcp://0.0.0.0:7700")
    run.add_argument("--advertise", help="the address peers should dial (default: --listen); "
                                         "required when listening on 0.0.0.0")
    run.add_argument("--join", action="append", default=None,
                     help="a peer bridge to contact first (repeat); the others are learned from it")
    run.add_argument("--node-id", type=int, help="this host's id, 1..4095 (default: from --advertise)")
    run.add_argument("--secret-file", help="file holding the cluster's shared secret (HMAC of every message)")
    run.add_argument("--curve-key-file",
                     help="file with the cluster's CURVE key pair (vela-bridge keygen): encrypts every link")
    run.add_argument("--insecure", action="store_true",
                     help="allow a non-loopback --listen without a secret (trusted networks only)")
    run.add_argument("--heartbeat", type=float, help="seconds between heartbeats (default 1.0)")
    run.add_argument("--failure-timeout", type=float,
                     help="seconds of silence before a peer is dead (default 5.0; suspect at half)")
    run.add_argument("--tombstone-ttl", type=float,
                     help="seconds a delete/flush/tag invalidation keeps stopping older late puts (default 300)")
    run.add_argument("--data-listen",
                     help="partitioned caches: HOST:PORT of the TCP port where workers send requests "
                          "(default: --listen's interface, its port + 1; not opened with CURVE)")
    run.add_argument("--backups", type=int, choices=(0, 1),
                     help="partitioned caches: keep a backup copy of each partition on a second member "
                          "(0 or 1, default 0; give every bridge the same)")
    run.add_argument("--metrics-listen", help="serve Prometheus metrics on HOST:PORT/metrics (e.g. 127.0.0.1:9464)")
    run.add_argument("--log-level", default="INFO")
    st = sub.add_parser("status", help="ask the bridge of a cache on this host for its state")
    st.add_argument("--cache", required=True)
    st.add_argument("--timeout", type=float, default=3.0)
    sub.add_parser("secret", help="print a new random shared secret")
    sub.add_parser("keygen", help="print a new CURVE key pair for --curve-key-file (two lines: public, secret)")
    return p


def _load_config(path):
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with open(path, "rb") as f:
        data = tomllib.load(f)
    known = {"cache", "listen", "advertise", "join", "node_id", "secret_file", "insecure", "curve_key_file",
             "heartbeat", "failure_timeout", "tombstone_ttl", "log_level", "metrics_listen", "backups",
             "data_listen"}
    unknown = set(data) - known
    if unknown:
        raise SystemExit(f"{path}: unknown option(s) {', '.join(sorted(unknown))}")
    return data


def run(args):
    conf = _load_config(args.config) if args.config else {}
    def opt(name):
        value = getattr(args, name, None)
        return value if value not in (None, False) else conf.get(name, _DEFAULTS.get(name))
    caches = opt("cache")
    caches = [caches] if isinstance(caches, str) else caches
    join = opt("join") or []
    join = [join] if isinstance(join, str) else join
    if not caches or not opt("listen"):
        raise SystemExit("vela-bridge run: --cache and --listen are required (or give them in --config)")
    logging.basicConfig(level=str(opt("log_level") or "INFO").upper(),
                        format="%(asctime)s vela-bridge[%(process)d] %(levelname)s %(message)s")
    from . import protocol
    from .node import Bridge

    try:
        secret = protocol.load_secret(opt("secret_file")) if opt("secret_file") else None
        curve = protocol.load_curve(opt("curve_key_file")) if opt("curve_key_file") else None
    except ValueError as exc:
        raise SystemExit(str(exc))

    try:
        bridge = Bridge(caches, opt("listen"), advertise=opt("advertise"), join=join, node_id=opt("node_id"),
                        secret=secret, heartbeat=opt("heartbeat"), failure_timeout=opt("failure_timeout"),
                        tombstone_ttl=opt("tombstone_ttl"), insecure=bool(opt("insecure")), curve=curve,
                        backups=int(opt("backups") or 0), data_listen=opt("data_listen"))
    except (ValueError, OSError) as exc:  # a bad option, an address in use
        raise SystemExit(f"vela-bridge: {exc}")
    logging.getLogger("vela.bridge").info("node %d listening on %s for %s", bridge.node_id, bridge.listen,
                                          ", ".join(caches))
    if opt("metrics_listen"):
        host, port = bridge.serve_metrics(opt("metrics_listen"))
        logging.getLogger("vela.bridge").info("metrics on http://%s:%d/metrics", host, port)
    bridge.run()


def status(args):
    from .client import BridgeClient

    from ..errors import BridgeUnavailable
    try:
        reply = BridgeClient(args.cache, {"bridge_timeout": args.timeout}).call({"op": "status"})
    except BridgeUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    if args.command == "secret":
        print(secrets.token_urlsafe(32))
        return 0
    if args.command == "keygen":
        import zmq

        public, secret = zmq.curve_keypair()
        print(public.decode())
        print(secret.decode())
        return 0
    if args.command == "status":
        return status(args)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""vela-bridge: command line.

    vela-bridge run --cache shop --listen tcp://10.0.0.5:7700 --join tcp://10.0.0.6:7700 \\
                    --secret-file /etc/vela/secret
    vela-bridge run --config /etc/vela/bridge.toml
    vela-bridge secret --out /etc/vela/secret  # a new shared secret for the cluster (mode 0600)
    vela-bridge keygen --out /etc/vela/curve   # a CURVE key pair: encrypted links (mode 0600)
    vela-bridge status --cache shop            # members, lag, counters (JSON)

Exit status: 0 fine; 2 an operator mistake (a missing file, a cache of another
layout, no bridge answering, a missing package), said in one line with its fix.
"""

import argparse
import json
import logging
import os
import secrets
import stat
import sys
import time

EXIT_USAGE = 2

_DEFAULTS = {"heartbeat": 1.0, "failure_timeout": 5.0, "tombstone_ttl": 300.0, "backups": 0, "on_split": "refuse",
             "async_backups": False}


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
    run.add_argument("--async-backups", action="store_true", default=None,
                     help="partitioned caches with --backups 1: acknowledge puts and deletes before the "
                          "backup holds them, and let workers write their host's partitions in place "
                          "(faster writes; those of the last moments before a bridge is killed are "
                          "served from the backup without them until the bridge is back, or lost if it "
                          "never is). Default: every write is acknowledged once the backup holds it")
    run.add_argument("--on-split", choices=("refuse", "continue"),
                     help="partitioned caches, a member that does not hear a majority of the cluster: "
                          "refuse writes (default: nothing acknowledged is lost when the split heals) or "
                          "continue (every side writes; the heal keeps the newest version of each key, "
                          "so writes and increments of one side can be lost)")
    run.add_argument("--metrics-listen", help="serve Prometheus metrics on HOST:PORT/metrics (e.g. 127.0.0.1:9464)")
    run.add_argument("--backend", choices=("shm", "file"),
                     help="where the host's table lives: shm (default) or file (with --data-dir)")
    run.add_argument("--data-dir", help="backend file: the directory holding <cache>.vela")
    run.add_argument("--log-level", default="INFO")
    st = sub.add_parser("status", help="ask the bridge of a cache on this host for its state")
    st.add_argument("--cache", required=True)
    st.add_argument("--timeout", type=float, default=3.0)
    for name, what in (("secret", "a new random shared secret"),
                       ("keygen", "a new CURVE key pair for --curve-key-file (two lines: public, secret)")):
        cmd = sub.add_parser(name, help=f"print {what}, or write it to --out FILE")
        cmd.add_argument("--out", metavar="FILE",
                         help="write it to FILE, created with mode 0600 (an existing FILE is left alone)")
    return p


class OperatorError(Exception):
    """A mistake the operator can fix: printed as one line, exit status 2."""


def _read_file(option, path, reader):
    """reader(path), with a missing or unreadable file said as one line naming the option."""
    try:
        return reader(path)
    except FileNotFoundError:
        fix = {"--secret-file": f" (make one with `vela-bridge secret --out {path}`)",
               "--curve-key-file": f" (make one with `vela-bridge keygen --out {path}`)"}.get(option, "")
        raise OperatorError(f"{option} {path}: no such file{fix}") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise OperatorError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:  # a malformed secret, key or config
        raise OperatorError(f"{option} {path}: {exc}") from None


def warn_if_readable_by_others(option, path):
    """A secret that the file's group or other users can read is no secret: say so."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        logging.getLogger("vela.bridge").warning(
            "%s %s is readable by %s (mode %04o): chmod 600 %s", option, path,
            "its group and other users" if mode & 0o044 == 0o044 else
            ("other users" if mode & 0o004 else "its group"), mode, path)


def _write_private(path, text):
    """Create ``path`` with mode 0600 holding ``text``; never overwrite a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise OperatorError(f"--out {path}: the file exists; remove it first if it is to be replaced "
                            "(every bridge and worker of the cluster must then get the new one)") from None
    except OSError as exc:
        raise OperatorError(f"--out {path}: cannot create it ({exc.strerror})") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _emit(args, text):
    if args.out:
        _write_private(args.out, text)
        return
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError):  # not a real file descriptor (captured output)
        mode = 0
    if stat.S_ISREG(mode) and stat.S_IMODE(mode) & 0o077:
        print(f"vela-bridge {args.command}: warning: the output file is readable by other users "
              f"(mode {stat.S_IMODE(mode):04o}); use --out FILE, which writes it with mode 0600", file=sys.stderr)
    sys.stdout.write(text)


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    from .._extras import need

    return need("tomli", "vela-bridge --config on Python < 3.11")


def _parse_config(path):
    tomllib = _tomllib()
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"not valid TOML: {exc}") from None


def _load_config(path):
    data = _read_file("--config", path, _parse_config)
    known = {"cache", "listen", "advertise", "join", "node_id", "secret_file", "insecure", "curve_key_file",
             "heartbeat", "failure_timeout", "tombstone_ttl", "log_level", "metrics_listen", "backups",
             "data_listen", "backend", "data_dir", "on_split", "async_backups"}
    unknown = set(data) - known
    if unknown:
        raise OperatorError(f"--config {path}: unknown option(s) {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(known))})")
    return data


def _backend(backend, data_dir):
    """(backend, backend_opts) of the host's tables, checked."""
    backend = backend or "shm"
    if backend == "file":
        if not data_dir:
            raise OperatorError("--backend file needs --data-dir DIR (the directory holding <cache>.vela)")
        return backend, {"data_dir": data_dir}
    if data_dir:
        raise OperatorError("--data-dir is for --backend file only")
    return backend, None


def _wait_for_caches(caches, backend, backend_opts, poll=0.2):
    """Wait until the workers have created every cache (with its topology): a bridge
    that made a missing one would make it local, and the workers would refuse it."""
    from .. import options
    from ..segments import segment_topology

    for name in caches:
        try:
            options.check_name(name)
        except ValueError as exc:
            raise OperatorError(f"--cache: {exc}") from None
    said = set()
    for name in caches:
        while segment_topology(name, backend, backend_opts) is None:
            if name not in said:
                said.add(name)
                logging.getLogger("vela.bridge").warning(
                    "cache %r does not exist on this host yet: waiting for its workers to create it "
                    "(they give it its topology)", name)
            time.sleep(poll)


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
        raise OperatorError("--cache and --listen are required (or give them in --config)")
    logging.basicConfig(level=str(opt("log_level") or "INFO").upper(),
                        format="%(asctime)s vela-bridge[%(process)d] %(levelname)s %(message)s")
    import zmq

    from . import protocol
    from ..errors import VelaError
    from .node import Bridge

    secret = curve = None
    if opt("secret_file"):
        secret = _read_file("--secret-file", opt("secret_file"), protocol.load_secret)
        warn_if_readable_by_others("--secret-file", opt("secret_file"))
    if opt("curve_key_file"):
        curve = _read_file("--curve-key-file", opt("curve_key_file"), protocol.load_curve)
        warn_if_readable_by_others("--curve-key-file", opt("curve_key_file"))
    backend, backend_opts = _backend(opt("backend"), opt("data_dir"))
    _wait_for_caches(caches, backend, backend_opts)

    try:
        bridge = Bridge(caches, opt("listen"), advertise=opt("advertise"), join=join, node_id=opt("node_id"),
                        secret=secret, heartbeat=opt("heartbeat"), failure_timeout=opt("failure_timeout"),
                        tombstone_ttl=opt("tombstone_ttl"), insecure=bool(opt("insecure")), curve=curve,
                        backups=int(opt("backups") or 0), data_listen=opt("data_listen"),
                        on_split=opt("on_split"), async_backups=bool(opt("async_backups")),
                        backend=backend, backend_opts=backend_opts)
    except (ValueError, OSError, zmq.ZMQError, VelaError) as exc:  # a bad option, an address in use, a layout
        raise OperatorError(str(exc)) from None
    if opt("metrics_listen"):
        try:
            host, port = bridge.serve_metrics(opt("metrics_listen"))
        except (OSError, ValueError) as exc:  # in use, or not HOST:PORT
            bridge.close()
            raise OperatorError(f"--metrics-listen {opt('metrics_listen')}: {getattr(exc, 'strerror', None) or exc}"
                                " (give a free HOST:PORT, e.g. 127.0.0.1:9464)") from None
        logging.getLogger("vela.bridge").info("metrics on http://%s:%d/metrics", host, port)
    logging.getLogger("vela.bridge").info("node %d listening on %s for %s", bridge.node_id, bridge.listen,
                                          ", ".join(caches))
    bridge.run()


def status(args):
    from ..stores.replicated import BridgeClient

    from ..errors import BridgeUnavailable
    client = BridgeClient(args.cache, {"bridge_timeout": args.timeout})
    try:
        reply = client.call({"op": "status"})
    except BridgeUnavailable:
        raise OperatorError(
            f"the bridge of cache {args.cache!r} did not answer at {client.endpoint} within {args.timeout:g} s: "
            f"is `vela-bridge run --cache {args.cache} ...` running on this host (with the same "
            "VELA_NAMESPACE, if one is set)?") from None
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    try:
        if args.command == "secret":
            _emit(args, secrets.token_urlsafe(32) + "\n")
            return 0
        from .._extras import need

        for module in ("zmq", "msgpack"):
            need(module, "vela-bridge")
        if args.command == "keygen":
            import zmq

            public, secret = zmq.curve_keypair()
            _emit(args, f"{public.decode()}\n{secret.decode()}\n")
            return 0
        if args.command == "status":
            return status(args)
        run(args)
    except (OperatorError, ImportError) as exc:
        print(f"vela-bridge {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The workload process of a simulated host (run with the host's environment).

``python client.py CONFIG_JSON``; roles:

- ``writer``: puts (one tag each), deletes, incrs of counters, a few tag
  invalidations, some reads, at ``rate`` operations a second; one ``flush`` at
  ``flush_at`` seconds when asked;
- ``reader``: reads only;
- ``flood``: puts (tagged ``FLOOD_TAG``, which nothing else uses) as fast as it can
  until the host's change log has wrapped ``wraps`` times, with one invalidation of
  that tag in the middle;
- ``invalidate``: one ``invalidate_tag`` of ``tag``;
- ``final``: reads every key once and prints {key: value} (not recorded).

Every call is recorded (``history.Recorder``); a call's exception never ends the
process: it is the ``fail``/``info`` of that call.
"""
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from faults.history import Recorder  # noqa: E402

PAD = "x" * 4000  # flood writes: the change log wraps in a few thousand puts
FLOOD_TAG = "wrap"
INDETERMINATE = ("BridgeUnavailable", "TimeoutError", "LockTimeout", "timeout")


def unpadded(value):
    return value.split("|", 1)[0] if isinstance(value, str) else value


def keys_of(cfg):
    return [f"k{i}" for i in range(cfg["keys"])] + counters_of(cfg)


def counters_of(cfg):
    return [f"c{i}" for i in range(cfg["counters"])]


def open_cache(cfg):
    import vela

    return vela.Cache(cfg["cache"], topology=cfg["topology"], sweep_interval=None,
                      topology_opts=cfg["topology_opts"], **cfg["cache_opts"])


class Client:
    def __init__(self, cfg):
        self.cfg = cfg
        self.cache = open_cache(cfg)
        self.rec = Recorder(cfg["out"], cfg["proc"], cfg["host"])
        self.rng = random.Random(cfg["seed"])
        self.count = 0

    def call(self, f, k=None, v=None, tags=(), tag=None, pad=""):
        """One recorded call; ``pad`` is stored after the value (``|pad``) and left out
        of the record: values are compared by ``unpadded``."""
        fields = {"k": k, "v": v, "tags": list(tags), "tag": tag}
        t0 = time.monotonic()
        n = self.rec.invoke(f, t0, **fields)
        try:
            if f == "put":
                self.cache.put(k, f"{v}|{pad}" if pad else v, tags=list(tags))
                result = {}
            elif f == "get":
                result = {"v": unpadded(self.cache.get(k))}
            elif f == "delete":
                result = {"r": self.cache.delete(k)}
            elif f == "incr":
                result = {"v": self.cache.incr(k)}
            elif f == "invalidate_tag":
                result = {"r": self.cache.invalidate_tag(tag)}
            elif f == "flush":
                result = {"r": self.cache.flush()}
            else:
                raise ValueError(f"unknown operation {f}")
        except Exception as exc:  # noqa: BLE001 - recorded as the call's outcome
            name = type(exc).__name__
            kind = "info" if name in INDETERMINATE or isinstance(exc, TimeoutError) else "fail"
            self.rec.complete(n, kind, time.monotonic(), err=name, msg=str(exc)[:200])
            return
        self.rec.complete(n, "ok", time.monotonic(), **result)

    def one_write_turn(self):
        cfg, rng = self.cfg, self.rng
        self.count += 1
        r = rng.random()
        if r < 0.70:
            self.call("put", f"k{rng.randrange(cfg['keys'])}", f"{cfg['proc']}:{self.count}",
                      tags=[f"t{rng.randrange(cfg['tags'])}"])
        elif r < 0.78:
            self.call("delete", f"k{rng.randrange(cfg['keys'])}")
        elif r < 0.88:
            self.call("incr", f"c{rng.randrange(cfg['counters'])}")
        elif r < 0.881:
            self.call("invalidate_tag", tag=f"t{rng.randrange(cfg['tags'])}")
        else:
            self.read_turn()

    def read_turn(self):
        keys = keys_of(self.cfg)
        self.call("get", keys[self.rng.randrange(len(keys))])

    def paced(self, turn):
        cfg = self.cfg
        start = cfg["start_at"]
        time.sleep(max(0.0, start - time.monotonic()))
        flush_at = cfg.get("flush_at")
        i = 0
        while True:
            now = time.monotonic()
            if now >= start + cfg["duration"]:
                return
            if flush_at is not None and now >= start + flush_at:
                self.call("flush")
                flush_at = None
            turn()
            i += 1
            time.sleep(max(0.0, start + i / cfg["rate"] - time.monotonic()))

    def flood(self):
        """Puts until the change log wrapped ``wraps`` times (one invalidation midway)."""
        cfg, rng = self.cfg, self.rng
        table = self.cache._table
        state = table.log_state()
        first, size = state["head"], state["size"]
        invalidated = False
        while table.log_state()["head"] - first < cfg["wraps"] * size:
            self.count += 1
            self.call("put", f"k{rng.randrange(cfg['keys'])}", f"{cfg['proc']}:{self.count}",
                      tags=[FLOOD_TAG], pad=PAD)
            if not invalidated and table.log_state()["head"] - first >= size // 2:
                self.call("invalidate_tag", tag=FLOOD_TAG)
                invalidated = True
        return self.count

    def final(self):
        missing = object()
        out = {}
        errors = 0
        for k in keys_of(self.cfg):
            if errors >= 5:  # a host that cannot answer: do not wait a timeout per key
                out[k] = {"error": "skipped"}
                continue
            try:
                v = self.cache.get(k, missing)
                out[k] = None if v is missing else unpadded(v)
            except Exception as exc:  # noqa: BLE001
                out[k] = {"error": type(exc).__name__}
                errors += 1
        return out

    def close(self):
        self.rec.close()
        self.cache.close()


def main(cfg):
    client = Client(cfg)
    try:
        role = cfg["role"]
        if role == "writer":
            client.paced(client.one_write_turn)
        elif role == "reader":
            client.paced(client.read_turn)
        elif role == "flood":
            print(json.dumps(client.flood()))
        elif role == "invalidate":
            client.call("invalidate_tag", tag=cfg["tag"])
        elif role == "final":
            print(json.dumps(client.final()))
        else:
            raise SystemExit(f"unknown role {role!r}")
    finally:
        client.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

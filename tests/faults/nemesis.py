"""The fault scenarios: what the nemesis does to the simulated hosts, and when.

A scenario's ``nemesis(run)`` runs while the workload runs (times are seconds after
the workload started) and records every fault with the hosts it hurts
(``run.fault``), so the checker knows which hosts were healthy when. Every fault is
healed by the scenario itself; ``Run.heal_all`` is only the safety net.
"""
import signal
import time

from . import checker, client, wire
from .runner import FAILURE_TIMEOUT, converge


class Scenario:
    name = "none"
    min_duration = 10.0  # seconds of workload at least (6 writers at 120 ops/s: about 7,000 operations)
    skew = None  # (host index, seconds): that host's wall clock offset for the whole run

    def before_start(self, run):
        """Before the bridges start (capture of traffic)."""

    def nemesis(self, run):
        run.sleep_until(run.duration)

    def after_converged(self, run, reads):
        """After the final reads (replay of traffic): extra columns."""
        return {}

    def __repr__(self):
        return self.name


def now():
    return time.monotonic()


class BridgeKill(Scenario):
    """SIGKILL host B's bridge twice; restart it after ``down`` seconds."""

    def __init__(self, name, down):
        self.name, self.down = name, down
        # The first restart (``down``, then a bridge's start) is over before the second kill.
        self.min_duration = max(Scenario.min_duration, (down + 3.0) / 0.4)

    def nemesis(self, run):
        b = 1
        for at in (run.duration * 0.3, run.duration * 0.7):
            run.sleep_until(at)
            t0 = now()
            run.hosts[b].kill_bridge(signal.SIGKILL)
            time.sleep(self.down)
            run.hosts[b].restart_bridge(wait=False)
            run.hosts[b].wait_bridge(timeout=20)
            run.fault(self.name, [b], t0, now())
        run.sleep_until(run.duration)


class BridgePause(Scenario):
    """SIGSTOP host B's bridge past the failure timeout, then SIGCONT."""

    name = "bridge-pause"
    min_duration = 12.0  # the pause (a failure timeout and 2 s) ends well before the workload

    def nemesis(self, run):
        run.sleep_until(run.duration * 0.3)
        t0 = now()
        run.hosts[1].pause()
        time.sleep(FAILURE_TIMEOUT + 2.0)
        run.hosts[1].resume()
        run.fault(self.name, [1], t0, now())
        run.sleep_until(run.duration)


class WorkerKill(Scenario):
    """SIGKILL a writer on each host in turn (its replacement starts at once)."""

    name = "worker-kill"

    def nemesis(self, run):
        for n, i in enumerate((0, 1, 2, 0, 1, 2)):
            run.sleep_until(run.duration * (0.15 + 0.12 * n))
            writers = run.writers_of(i)
            if writers:
                run.kill_client(writers[0])  # a process dies: the host itself stays healthy
        run.sleep_until(run.duration)


class Isolate(Scenario):
    """Host C cut off from every other host for ``seconds``, ``times`` times."""

    def __init__(self, name="isolate", seconds=10.0, times=2, skew=None):
        self.name, self.seconds, self.times, self.skew = name, seconds, times, skew
        self.min_duration = times * (seconds + 5.0) + 5.0

    def nemesis(self, run):
        c = 2
        for n in range(self.times):
            run.sleep_until(3.0 + n * (self.seconds + 5.0))
            t0 = now()
            run.net.isolate(c)
            time.sleep(self.seconds)
            run.net.heal(c)
            run.fault(self.name, range(len(run.hosts)), t0, now())
        run.sleep_until(run.duration)


class Split(Scenario):
    """Host A on one side, B and C on the other, for 10 s."""

    name = "split-1|2"
    min_duration = 20.0

    def nemesis(self, run):
        run.sleep_until(4.0)
        t0 = now()
        run.net.cut(0, [1, 2])
        run.net.cut(1, [0])
        run.net.cut(2, [0])
        time.sleep(10.0)
        run.net.heal()
        run.fault(self.name, range(len(run.hosts)), t0, now())
        run.sleep_until(run.duration)


class Loss(Scenario):
    """30 % of host B's packets dropped, both ways, for 10 s (this kernel has no netem:
    no delay, only loss, with iptables' statistic match)."""

    name = "packet-loss"
    min_duration = 20.0

    def nemesis(self, run):
        run.sleep_until(4.0)
        t0 = now()
        run.net.lose(1, 0.3)
        time.sleep(10.0)
        run.net.heal(1)
        run.fault(self.name, range(len(run.hosts)), t0, now())
        run.sleep_until(run.duration)


class LogWrap(Scenario):
    """Host B's bridge stopped (SIGSTOP) while a worker of B writes until the change log
    wrapped twice (trying a tag invalidation midway), and host A invalidates the
    flood's tag meanwhile; then B's bridge resumes (stopped past the failure timeout)."""

    name = "log-wrap"

    def nemesis(self, run):
        run.sleep_until(run.duration * 0.3)
        t0 = now()
        run.hosts[1].pause()
        cfg = run.client_config(1, "flood", "Bflood", wraps=2, start_at=0, duration=0, rate=0)
        _bounded(run.launch(1, cfg), 60)
        time.sleep(max(0.0, t0 + FAILURE_TIMEOUT + 1.0 - now()))
        cfg = run.client_config(0, "invalidate", "Ainvalidate", tag=client.FLOOD_TAG, start_at=0, duration=0,
                                rate=0)
        _bounded(run.launch(0, cfg), 30)
        run.hosts[1].resume()
        run.fault(self.name, [1], t0, now())
        run.sleep_until(run.duration)


def _bounded(proc, seconds):
    try:
        proc.wait(seconds)
    except Exception:  # noqa: BLE001 - a client that does not end is killed
        proc.kill()
        proc.wait(10)


class Combined(Scenario):
    """Two faults at once, then a third: C isolated, B's bridge frozen, A's bridge
    killed and restarted; all healed after 10 s."""

    name = "isolate+freeze+kill"
    min_duration = 22.0

    def nemesis(self, run):
        run.sleep_until(4.0)
        t0 = now()
        run.net.isolate(2)
        run.hosts[1].pause()
        time.sleep(1.0)
        run.hosts[0].kill_bridge(signal.SIGKILL)
        time.sleep(1.0)
        run.hosts[0].restart_bridge(wait=False)
        time.sleep(8.0)
        run.net.heal(2)
        run.hosts[1].resume()
        run.hosts[0].wait_bridge(timeout=20)
        run.fault(self.name, range(len(run.hosts)), t0, now())
        run.sleep_until(run.duration)


class Replay(Scenario):
    """Bridge and data-port traffic captured from the start; after the hosts converged,
    every captured connection is sent again (``forged``: with its MACs altered). The
    column counts keys whose value changed on some host (keys the hosts did not
    agree on before are left out: they may change without any replay)."""

    min_duration = 12.0

    def __init__(self, name, forged):
        self.name, self.forged = name, forged
        self.capture = None

    def before_start(self, run):
        ports = [h.port for h in run.hosts] + [h.data_port for h in run.hosts]
        self.capture = wire.Capture(run.net.outer_prefix, ports)

    def nemesis(self, run):
        run.sleep_until(run.duration * 0.5)
        self.capture.stop()
        run.sleep_until(run.duration)

    def after_converged(self, run, reads):
        self.capture.stop()
        streams = self.capture.streams()
        sent = wire.resend(streams, forge=self.forged)
        time.sleep(3.0)
        after = converge(run)
        unsettled = set(checker.diverging_keys(reads))  # may change with no replay at all
        changed = sorted({k for h in reads for k in (reads[h] or {})
                          if (after.get(h) or {}).get(k) != (reads[h] or {}).get(k)} - unsettled)
        return {"replay": {"streams": len(streams), "sent": sent, "changed_keys": len(changed),
                           "examples": changed[:5]}}


SCENARIOS = {s.name: s for s in [
    Scenario(),
    BridgeKill("bridge-kill-fast", down=0.5),
    BridgeKill("bridge-kill-slow", down=3.5),
    BridgePause(),
    WorkerKill(),
    Isolate(),
    Split(),
    Isolate("clock-3s-behind+isolate", seconds=10.0, times=1, skew=(2, -3.0)),
    Loss(),
    LogWrap(),
    Combined(),
    Replay("replay", forged=False),
    Replay("forged", forged=True),
]}

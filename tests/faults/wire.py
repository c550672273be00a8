"""Capture of the hosts' TCP traffic, and its replay (as captured, or forged).

``Capture`` reads every frame crossing the hosts' veth links (an AF_PACKET socket in
the test's namespace, where the links' outer ends are) and keeps, for each TCP
connection to a bridge port or data port whose opening (SYN) it saw, the bytes the
client sent, reassembled by sequence number (a frame seen on both links, or
retransmitted, is kept once).

``resend`` opens a new connection from the test's namespace to the same address and
sends those bytes again. A ZeroMQ connection (ZMTP 3) is replayed as a new peer: its
READY command's Identity is replaced by a fresh one (a ROUTER refuses a second
connection with an identity it holds, which would hide what the bridge does with
the messages). ``forge=True`` alters every message's MAC frame (ZMTP) or MAC
(data port), keeping the payload: what an attacker without the secret can do.
"""
import os
import socket
import struct
import threading
import time

ETH_P_ALL = 0x0003
ZMTP_GREETING = 64
MAC_SIZE = 32


class Capture:
    def __init__(self, link_prefix, ports, limit=8 << 20):
        self.prefix, self.ports, self.limit = link_prefix, set(ports), limit
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.settimeout(0.2)
        self.isn = {}  # (src, sport, dst, dport) -> first data sequence number
        self.segments = {}  # same key -> {offset: bytes}
        self.size = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.done.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            if addr[0].startswith(self.prefix):
                self._frame(data)
        self.sock.close()

    def _frame(self, data):
        if len(data) < 34 or data[12:14] != b"\x08\x00":
            return
        ip = data[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            return
        total = struct.unpack(">H", ip[2:4])[0]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        if dport not in self.ports:
            return
        key = (src, sport, dst, dport)
        flags = tcp[13]
        if flags & 0x02:  # SYN
            self.isn[key] = (seq + 1) & 0xFFFFFFFF
            self.segments[key] = {}
            self.size[key] = 0
            return
        payload = tcp[(tcp[12] >> 4) * 4:]
        if not payload or key not in self.isn or self.size[key] > self.limit:
            return
        offset = (seq - self.isn[key]) & 0xFFFFFFFF
        if offset not in self.segments[key]:
            self.segments[key][offset] = payload
            self.size[key] += len(payload)

    def stop(self):
        self.done.set()
        self.thread.join(5)

    def streams(self):
        """[((dst, dport), bytes)]: the client side of each connection, as far as it is
        contiguous from its start."""
        out = []
        for key, segs in self.segments.items():
            buf, pos = bytearray(), 0
            for offset in sorted(segs):
                seg = segs[offset]
                if offset > pos:
                    break
                buf += seg[pos - offset:]
                pos = max(pos, offset + len(seg))
            if buf:
                out.append(((key[2], key[3]), bytes(buf)))
        return out


def is_zmtp(data):
    return len(data) >= ZMTP_GREETING and data[0] == 0xFF and data[9] == 0x7F


def rewrite_zmtp(data, forge):
    """The stream with a fresh Identity in READY and, with ``forge``, altered MACs."""
    out = bytearray(data[:ZMTP_GREETING])
    pos, first = ZMTP_GREETING, True
    while pos < len(data):
        flags = data[pos]
        if flags & 0x02:
            if pos + 9 > len(data):
                break
            size = struct.unpack(">Q", data[pos + 1:pos + 9])[0]
            head = 9
        else:
            if pos + 2 > len(data):
                break
            size, head = data[pos + 1], 2
        body = data[pos + head:pos + head + size]
        if len(body) < size:
            break  # the capture ended inside this frame
        pos += head + size
        if flags & 0x04:
            body = _ready_with_new_identity(body)
        else:
            if forge and first and size == MAC_SIZE:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            first = not flags & 0x01
        out += _zmtp_frame(flags & ~0x02, body)
    return bytes(out)


def _zmtp_frame(flags, body):
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _ready_with_new_identity(body):
    name_len = body[0]
    if body[1:1 + name_len] != b"READY":
        return body
    props, pos = [], 1 + name_len
    while pos < len(body):
        n = body[pos]
        name = body[pos + 1:pos + 1 + n]
        vlen = struct.unpack(">I", body[pos + 1 + n:pos + 5 + n])[0]
        value = body[pos + 5 + n:pos + 5 + n + vlen]
        pos += 5 + n + vlen
        if name.lower() == b"identity":
            value = b"replay-" + os.urandom(6).hex().encode()
        props.append(bytes([len(name)]) + name + struct.pack(">I", len(value)) + value)
    return body[:1 + name_len] + b"".join(props)


def forge_dataport(data):
    """The data-port stream with every frame's MAC altered."""
    out, pos = bytearray(), 0
    while pos + 5 <= len(data):
        length, mac_len = struct.unpack(">IB", data[pos:pos + 5])
        end = pos + 5 + mac_len + length
        if end > len(data):
            break
        mac = data[pos + 5:pos + 5 + mac_len]
        if mac:
            mac = bytes([mac[0] ^ 0xFF]) + mac[1:]
        out += data[pos:pos + 5] + mac + data[pos + 5 + mac_len:end]
        pos = end
    return bytes(out)


def resend(streams, forge=False, linger=0.5):
    """Send each captured stream again on a new connection; how many were sent."""
    sent = 0
    for (host, port), data in streams:
        if is_zmtp(data):
            data = rewrite_zmtp(data, forge)
        elif forge:
            data = forge_dataport(data)
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.sendall(data)
                time.sleep(linger)
                sent += 1
        except OSError:
            continue
    return sent

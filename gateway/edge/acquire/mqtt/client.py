"""The paho client the MQTT source runs, with its network thread's reads made cheaper.

It calls paho internals (2.1, 2.2): ``_PAHO_INTERNALS`` checks they are there, and any other
layout falls back to paho's own code, unchanged.
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

READ_BURST = 64  # packets read per wake-up of paho's network thread, when that many are waiting
RECV_CHUNK = 65536  # bytes taken from the socket per recv(); paho's reads are served from them


_PAHO_INTERNALS = all(
    hasattr(mqtt.Client, name)
    for name in ("_packet_read", "_loop_rc_handle", "_sock_recv", "_handle_on_message")
)
_time = getattr(mqtt, "time_func", None)
# The properties of every PUBLISH that has none (the common case): paho builds a Properties per
# message (about 7 us: it fills its tables in __init__, then clears 40 names to unpack nothing).
_NO_PROPERTIES = Properties(PacketTypes.PUBLISH)


class PahoClient(mqtt.Client):
    """paho's client, reading up to READ_BURST waiting packets per wake-up of its network loop,
    from one recv() per RECV_CHUNK bytes.

    paho's ``loop_read`` reads one packet per ``select()`` when nothing of ours is in flight (it
    overrides its ``max_packets``), so a backlog costs a loop round per message; and it reads a
    packet in three recv() calls or more (command byte, each length byte, body), each of which
    lets go of the GIL. This is its body with the burst; it stops, as paho's does, at the first
    read that would block, but not before the bytes already taken from the socket are read (the
    socket's select() would not say they are there)."""

    _rbuf = b""  # taken from the socket, not yet read by paho
    _rpos = 0
    _rsock: Any = None  # the socket _rbuf came from: a new connection starts afresh

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        if not _PAHO_INTERNALS:  # a paho whose internals differ: its own loop, unchanged
            return super().loop_read(max_packets)
        if self._sock is None:
            return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
        burst = max(READ_BURST, len(self._out_messages) + len(self._in_messages))
        n = 0
        while True:
            if self._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            n += 1
            if n >= burst and self._rpos >= len(self._rbuf):
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        if not _PAHO_INTERNALS:
            return super()._sock_recv(bufsize)
        if self._rsock is not self._sock or self._rpos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, RECV_CHUNK))  # BlockingIOError: nothing there
            self._rsock = self._sock
            if len(data) <= bufsize:  # all of it asked for (or the end of the connection)
                self._rbuf, self._rpos = b"", 0
                return data
            self._rbuf, self._rpos = data, 0
        pos = self._rpos
        chunk = self._rbuf[pos : pos + bufsize]
        self._rpos = pos + len(chunk)
        return chunk

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        """paho's, for a QoS 1 MQTT v5 PUBLISH without properties under manual ack (what the
        source subscribes to): the same MQTTMessage, with the one empty Properties. Anything
        else, a malformed packet included, goes to paho's own."""
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        if (
            not _PAHO_INTERNALS
            or _time is None
            or (header & 0x06) != 0x02
            or self._protocol != mqtt.MQTTv5
            or not self._manual_ack
            or len(packet) < 2
        ):
            return super()._handle_publish()
        props = 2 + int.from_bytes(packet[:2], "big") + 2  # topic length, topic, packet id
        if len(packet) <= props or packet[props] != 0:  # properties, or too short: paho decides
            return super()._handle_publish()
        message = mqtt.MQTTMessage(
            mid=struct.unpack_from("!H", packet, props - 2)[0], topic=bytes(packet[2 : props - 2])
        )
        message.dup = bool(header & 0x08)
        message.qos = 1
        message.retain = bool(header & 0x01)
        message.properties = _NO_PROPERTIES
        message.payload = bytes(memoryview(packet)[props + 1 :])
        message.timestamp = _time()
        self._handle_on_message(message)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

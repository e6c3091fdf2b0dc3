"""The paho client the MQTT source runs: packets are read from one recv() per RECV_CHUNK bytes,
every packet already taken from the socket is read before the network loop waits again, and a
PUBLISH without properties is the message paho makes, without a Properties built for it."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.exception import MalformedPacket

from gateway.edge.acquire.mqtt.client import READ_BURST, PahoClient


def publish_packet(mid: int, body: bytes) -> bytes:
    """An MQTT v5 PUBLISH, QoS 1, no properties."""
    topic = b"t/json/s1"
    rest = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + b"\x00" + body
    assert len(rest) < 128  # one length byte
    return b"\x32" + bytes([len(rest)]) + rest


@pytest.fixture
def client() -> Iterator[tuple[PahoClient, socket.socket, list[bytes]]]:
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    c = PahoClient(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5,
                manual_ack=True)  # fmt: skip
    c._sock = ours
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    got: list[bytes] = []
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    yield c, broker, got
    ours.close()
    broker.close()


def test_one_wake_up_reads_every_packet_taken_from_the_socket(client):
    """More than a burst arrives in one recv(): the socket's select() would not say the rest is
    there, so loop_read reads it all before it returns."""
    c, broker, got = client
    n = 3 * READ_BURST + 5
    broker.sendall(b"".join(publish_packet(i + 1, b"%d" % i) for i in range(n)))
    assert c.loop_read() == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [b"%d" % i for i in range(n)]


def test_a_packet_split_across_reads_is_read_whole(client):
    c, broker, got = client
    data = publish_packet(1, b"first") + publish_packet(2, b"second")
    broker.sendall(data[:30])
    c.loop_read()
    broker.sendall(data[30:])
    c.loop_read()
    assert got == [b"first", b"second"]


def test_a_new_connection_does_not_read_bytes_left_from_the_old_one(client):
    c, broker, got = client
    c._rbuf, c._rpos, c._rsock = publish_packet(7, b"stale"), 0, object()
    broker.sendall(publish_packet(1, b"fresh"))
    c.loop_read()
    assert got == [b"fresh"]


def received(c: PahoClient, header: int, packet: bytes) -> mqtt.MQTTMessage:
    got: list[mqtt.MQTTMessage] = []
    c.on_message = lambda _c, _u, msg: got.append(msg)
    c._in_packet["command"], c._in_packet["packet"] = header, bytearray(packet)
    assert c._handle_publish() == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
    return got[0]


def test_a_publish_without_properties_is_the_message_paho_makes(client):
    """The fast path (no Properties built per message) gives what paho's own path gives."""
    c, _, _ = client
    packet = publish_packet(513, b'{"value": 1}')[2:]  # after the fixed header
    for header in (0x32, 0x3B):  # QoS 1; QoS 1 with DUP and RETAIN
        ours = received(c, header, packet)
        theirs: list[mqtt.MQTTMessage] = []
        c.on_message = lambda _c, _u, msg, theirs=theirs: theirs.append(msg)
        c._in_packet["command"], c._in_packet["packet"] = header, bytearray(packet)
        mqtt.Client._handle_publish(c)  # paho's own
        paho = theirs[0]
        same = ("mid", "topic", "payload", "qos", "dup", "retain")
        assert {k: getattr(ours, k) for k in same} == {k: getattr(paho, k) for k in same}
        assert type(ours.payload) is bytes
        assert str(ours.properties) == str(paho.properties)


def test_a_publish_with_properties_keeps_them(client):
    c, _, _ = client
    topic = b"t/json/s1"
    packet = struct.pack("!H", len(topic)) + topic + struct.pack("!H", 9) + b"\x02\x01\x01" + b"{}"
    msg = received(c, 0x32, packet)
    assert msg.properties.PayloadFormatIndicator == 1
    assert (msg.mid, msg.payload) == (9, b"{}")


def test_a_truncated_publish_is_paho_s_malformed_packet(client):
    c, _, _ = client
    c._in_packet["command"], c._in_packet["packet"] = 0x32, bytearray(b"\x00\x64t/")
    with pytest.raises(MalformedPacket):
        c._handle_publish()

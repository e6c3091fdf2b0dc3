"""The test broker is what a plant's broker should be: auth on, anonymous off, TLS verified."""

import ssl
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest

pytestmark = pytest.mark.integration


def _client(env, *, username=None, password=None, tls=False):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    if username is not None:
        c.username_pw_set(username, password)
    port = int(env["MQTT_TLS_PORT"] if tls else env["MQTT_PORT"])
    if tls:
        c.tls_set(ca_certs=env["MQTT_CA_FILE"], cert_reqs=ssl.CERT_REQUIRED)
    return c, port


def _connect_result(env, **kw):
    c, port = _client(env, **kw)
    done = threading.Event()
    result = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()

    c.on_connect = on_connect
    c.connect(env["MQTT_HOST"], port)
    c.loop_start()
    assert done.wait(10), "broker did not answer CONNECT"
    c.disconnect()
    c.loop_stop()
    return result["rc"]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_publish_and_receive_with_auth(mqtt_env, tls):
    user, pw = mqtt_env["MQTT_USERNAME"], mqtt_env["MQTT_PASSWORD"]
    topic = f"test/{uuid.uuid4().hex}"
    got = []
    subscribed = threading.Event()
    received = threading.Event()

    sub, port = _client(mqtt_env, username=user, password=pw, tls=tls)
    sub.on_subscribe = lambda *a: subscribed.set()

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        received.set()

    sub.on_message = on_message
    sub.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    sub.connect(mqtt_env["MQTT_HOST"], port)
    sub.loop_start()
    assert subscribed.wait(10)

    pub, _ = _client(mqtt_env, username=user, password=pw, tls=tls)
    pub.connect(mqtt_env["MQTT_HOST"], port)
    pub.loop_start()
    pub.publish(topic, b'{"value": 7.1}', qos=1).wait_for_publish(10)
    assert received.wait(10)
    assert got == [b'{"value": 7.1}']
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()


def test_wrong_password_is_refused(mqtt_env):
    rc = _connect_result(mqtt_env, username=mqtt_env["MQTT_USERNAME"], password="wrong")
    assert rc.is_failure and rc.value in (4, 5, 134, 135)


def test_anonymous_client_is_refused(mqtt_env):
    rc = _connect_result(mqtt_env)
    assert rc.is_failure


def test_tls_rejects_a_server_it_cannot_verify(mqtt_env, tmp_path):
    import subprocess

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.username_pw_set(mqtt_env["MQTT_USERNAME"], mqtt_env["MQTT_PASSWORD"])
    c.tls_set(ca_certs=str(cert), cert_reqs=ssl.CERT_REQUIRED)
    with pytest.raises(ssl.SSLError):
        c.connect(mqtt_env["MQTT_HOST"], int(mqtt_env["MQTT_TLS_PORT"]))

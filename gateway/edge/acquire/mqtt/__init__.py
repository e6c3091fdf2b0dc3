"""MQTT: pure payload parsing (payload) apart from the paho client (source)."""

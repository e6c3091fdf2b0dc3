"""How both services reach Kafka: one connection section shape, one librdkafka config builder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.common.config import SECRET, secret


@dataclass(kw_only=True)
class KafkaConnection:
    """Connection keys shared by ``[kafka]`` (gateway) and ``[processor]`` (processor)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-256"
    sasl_username: str = ""
    sasl_password: str = field(default="", metadata=SECRET)  # env:, file: or cred:, never itself
    ssl_ca_location: str = ""
    extra: dict[str, str | int | bool] = field(default_factory=dict)  # other librdkafka settings
    source: str = field(default="config", init=False)  # the config file, for error messages

    def __post_init__(self) -> None:
        if self.security_protocol.startswith("SASL") and not self.sasl_username:
            raise ValueError(f"sasl_username is required with {self.security_protocol}")

    def client_conf(self, *, client_id: str, section: str) -> dict[str, Any]:
        """librdkafka settings for this connection; the password is resolved only here."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": client_id,
            "reconnect.backoff.max.ms": 10000,
        }
        if self.security_protocol.startswith("SASL"):
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = secret(
                self.sasl_password, source=self.source, key=f"{section}.sasl_password"
            )
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        return conf

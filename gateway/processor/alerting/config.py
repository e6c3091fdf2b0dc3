"""TOML ``[notifications]``: channels (credentials as ``env:``/``file:``/``cred:``), routes, timing.

```toml
[notifications]
enabled = true
state_path = "/var/lib/edge-processor/alerts.db"
group_wait = 30          # seconds a new alarm waits for others of its group before it is sent
repeat_interval = 14400  # seconds between reminders while an alarm stays active and unacknowledged
flood_count = 10         # more than this many alarms ...
flood_window = 600       # ... in this many seconds on one plant: one summary instead

[notifications.email.ops]
host = "smtp.example.org"
port = 587
tls = "starttls"          # starttls, implicit or none
username = "alerts@example.org"
password = "env:SMTP_PASSWORD"
sender = "alerts@example.org"
to = ["oncall@example.org"]

[notifications.sms.oncall]
account_sid = "AC..."
auth_token = "env:TWILIO_TOKEN"
from_number = "+15550100"
to = ["+15550111"]

[notifications.webhook.chat]
url = "https://hooks.slack.com/services/..."
format = "slack"         # slack or generic
secret = "env:WEBHOOK_SECRET"

[[notifications.routes]]
levels = ["critical"]
channels = ["ops", "oncall", "chat"]
```

Without routes, critical alarms go to every channel and warnings to none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gateway.common.config import SECRET

LEVELS = ("warning", "critical")


@dataclass(kw_only=True)
class ChannelConfig:
    """What every channel has: its timeout, rate limit and retry policy."""

    timeout_seconds: float = 10.0
    rate_per_minute: float = 30.0  # at most this many sends a minute
    retry_max_seconds: float = 300.0  # back-off cap between attempts
    max_attempts: int = 50  # then the notification is given up (and counted failed)

    def __post_init__(self) -> None:
        if self.timeout_seconds <= 0 or self.rate_per_minute <= 0 or self.retry_max_seconds <= 0:
            raise ValueError("timeout_seconds, rate_per_minute and retry_max_seconds must be > 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


@dataclass(kw_only=True)
class EmailConfig(ChannelConfig):
    host: str
    port: int = 587
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str = ""
    password: str = field(default="", metadata=SECRET)
    ca_file: str = ""  # extra CA to trust (a private relay); "" = the system's
    sender: str
    to: list[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.to:
            raise ValueError("to must name at least one address")


@dataclass(kw_only=True)
class SmsConfig(ChannelConfig):
    base_url: str = "https://api.twilio.com"
    account_sid: str
    auth_token: str = field(metadata=SECRET)
    from_number: str
    to: list[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base_url.startswith(("http://", "https://")) or not self.to:
            raise ValueError("base_url must be http(s) and to must name at least one number")


@dataclass(kw_only=True)
class WebhookConfig(ChannelConfig):
    url: str
    format: Literal["generic", "slack"] = "generic"
    secret: str = field(default="", metadata=SECRET)  # HMAC-SHA256 key for X-Signature

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")


@dataclass
class RouteConfig:
    """Alarms matching every given filter (empty = any) go to ``channels``."""

    channels: list[str]
    levels: list[str] = field(default_factory=lambda: list(LEVELS))
    plants: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    resolved: bool = True  # send a "resolved" message when the alarm clears

    def __post_init__(self) -> None:
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad:
            raise ValueError(f"levels must be warning or critical, got {bad}")

    def matches(self, plant: str, parameter: str, level: str) -> bool:
        """Whether an alarm goes this way; ``parameter`` "" (a flood summary) matches any."""
        return (
            level in self.levels
            and (not self.plants or plant in self.plants)
            and (not self.parameters or not parameter or parameter in self.parameters)
        )


@dataclass
class NotificationsConfig:
    enabled: bool = False
    state_path: str = "alerts.db"
    actions_topic: str = "sensors.alert-actions"
    group_wait: float = 30.0
    repeat_interval: float = 4 * 3600.0
    flood_count: int = 10
    flood_window: float = 600.0
    email: dict[str, EmailConfig] = field(default_factory=dict)
    sms: dict[str, SmsConfig] = field(default_factory=dict)
    webhook: dict[str, WebhookConfig] = field(default_factory=dict)
    routes: list[RouteConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.group_wait < 0 or self.repeat_interval <= 0 or self.flood_window <= 0:
            raise ValueError("group_wait >= 0, repeat_interval and flood_window > 0")
        if self.flood_count < 1:
            raise ValueError("flood_count must be at least 1")
        names = [*self.email, *self.sms, *self.webhook]
        if len(set(names)) != len(names):
            raise ValueError("channel names must be unique across email, sms and webhook")
        for r in self.routes:
            unknown = [c for c in r.channels if c not in names]
            if unknown:
                raise ValueError(f"a route names unknown channels: {unknown}")
        if not self.routes:
            self.routes = [RouteConfig(channels=names, levels=["critical"])]

    def channel_names(self) -> list[str]:
        return [*self.email, *self.sms, *self.webhook]

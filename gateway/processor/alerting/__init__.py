"""The processor's alert handler: alert state, notification discipline, channels, operator actions.

- ``config``: the ``[notifications]`` section (channels, routes, timing);
- ``routing``: the discipline as pure logic (grouping, repeat, inhibition, flood, shelve, out of
  service), unit-tested without I/O;
- ``statedb``: the SQLite alert state, history and notification outbox;
- ``channels``: email (SMTP), SMS (Twilio-compatible form POST), webhook (HMAC-signed JSON);
- ``senders``: one queue and worker per channel (retries, back-off, rate limit, timeout);
- ``notifier``: the stage that consumes the alerts topic and operator actions and wires the above;
- ``api``: the HTTP API the CLI uses (``/api/alerts*``).
"""

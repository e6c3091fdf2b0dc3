"""What the tests, ``scripts/demo_plants.py`` and ``scripts/bench`` share, imported one way:
``from tests.support.<module> import ...`` (the scripts put the repository root on sys.path).

wait.py      polling until a condition holds
net.py       free ports on 127.0.0.1
services.py  the real servers' variables (var/services.env), started when missing
gateway_harness.py, processor_harness.py   the two services run as real processes
"""

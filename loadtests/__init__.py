"""Load runs of fleet provisioning on Locust (issue 8): users, shapes, setup, truth.

``loadtests/locustfile.py`` is what Locust loads (``locust -f loadtests/locustfile.py``,
or ``fleetbench load``). Only ``users``, ``session`` and ``locustfile`` import Locust
(which patches the process with gevent); ``shapes``, ``events``, ``flows``,
``fleet_setup``, ``truth`` and ``report`` are plain modules, tested without it.
"""

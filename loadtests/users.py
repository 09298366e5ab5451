"""Locust users: each one is a device slot that provisions a fresh device per task.

Built on the pattern of Locust's own MQTT user (``locust.contrib.mqtt.MqttUser``): paho
clients whose outcomes are fired as ``request`` events. Locust's class is not subclassed
because it owns one client connected for the user's lifetime, while a provisioning device
opens two connections per flow (the claim's, then its own) and never reuses them. As its
``use_loop_selectors`` option intends, no client runs paho's ``select()`` loop: every
connection of the process is driven by one :class:`devices.mqtt_transport.LoopDriver` in
a greenlet (perf-notes: ``select()`` stalls at ~340 clients; a selectors loop held 3,000).

Flows per second come from pacing: a user starts a flow every ``pacing_s`` seconds
(Locust's ``constant_pacing``, with the pacing the load shape chose), so that
``users = rate x pacing`` (:mod:`loadtests.shapes`).

* :class:`ClaimKeysUser`: by claim, CreateKeysAndCertificate;
* :class:`ClaimCsrUser`: by claim, CreateCertificateFromCsr (the device's key never leaves it);
* :class:`TrustedUserUser`: by trusted user: CreateProvisioningClaim through the control
  plane (the installer's app), then the same MQTT calls with the temporary claim
  (``--fleet-trusted-cert csr|keys``).

``--fleet-format json|cbor`` picks the payload format for all of them; subclass and set
``payload_format``/``mqtt_version`` to mix formats in one run.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from typing import ClassVar

from locust import User, task
from locust.exception import StopUser

from devices.base import CertApi, Flow
from loadtests.events import new_serial
from loadtests.flows import DeviceSlot
from loadtests.session import LoadSession

log = logging.getLogger("fleetbench.load.users")

__all__ = ["ClaimCsrUser", "ClaimKeysUser", "ProvisioningUser", "TrustedUserUser"]


class ProvisioningUser(User):
    """One device slot (abstract): set ``flow`` and ``cert_api`` in a subclass."""

    abstract = True
    flow: ClassVar[Flow] = Flow.CLAIM
    #: None: the ``--fleet-trusted-cert`` option decides.
    cert_api: ClassVar[CertApi | None] = CertApi.CSR

    def __init__(self, environment: object) -> None:
        super().__init__(environment)
        self._flow_started = 0.0
        self.session: LoadSession | None = None
        self.slot: DeviceSlot | None = None

    def wait_time(self) -> float:
        """Locust's constant pacing, with the pacing of the run's load shape."""
        assert self.session is not None
        return max(0.0, self._flow_started + self.session.pacing_s - time.monotonic())

    def on_start(self) -> None:
        self.session = LoadSession.of(self.environment)
        target = self.session.wait_target()
        if target is None:
            log.error("event=user_without_fleet (setup failed or no handoff): stopping")
            raise StopUser()
        settings = self.session.flow_settings(self.flow, self.cert_api)
        self.slot = DeviceSlot(target, settings, self.session.new_slot_dir(), self.session.sink,
                               driver=self.session.driver, online=self.session.device_online)
        if self.session.spread_s > 0:  # Locust starts a spawn step's users all at once
            time.sleep(random.uniform(0.0, self.session.spread_s))

    @task
    def provision(self) -> None:
        """One new device, from claim to its own certificate."""
        assert self.session is not None and self.slot is not None
        self._flow_started = time.monotonic()
        try:
            outcome = self.slot.run(new_serial())
        except BaseException:
            # Killed by the end of the run. A flow that had not finished a step yet left
            # nothing behind (Locust may kill a user just as its next flow starts).
            cut = self.slot.interrupted
            if cut is not None and cut.steps:
                self.session.record(cut)
            raise
        self.session.record(outcome)

    def on_stop(self) -> None:
        if self.slot is not None:
            shutil.rmtree(self.slot.workdir, ignore_errors=True)


class ClaimKeysUser(ProvisioningUser):
    """Provisioning by claim with CreateKeysAndCertificate."""

    flow = Flow.CLAIM
    cert_api = CertApi.KEYS


class ClaimCsrUser(ProvisioningUser):
    """Provisioning by claim with CreateCertificateFromCsr."""

    flow = Flow.CLAIM
    cert_api = CertApi.CSR


class TrustedUserUser(ProvisioningUser):
    """Provisioning by trusted user: a temporary claim per device from the control plane."""

    flow = Flow.TRUSTED_USER
    cert_api = None

"""The broker's policy caches against the real registry: prepared policy sets shared between
connections, and cached decisions that change when what they were decided from changes.

Spec broker §1.9: Publish, Subscribe and Receive are checked per operation against the current
policies; §3.4 policy set of a connection; §3.5 policy variables. The registry's events drive
:meth:`Authentication.invalidate` as the broker's ``_registry_event`` does (synchronously here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from harness import pki
from harness.emulator.auth import Authentication, ConnectionAuthorization, Principal
from harness.emulator.broker_settings import BrokerSettings
from harness.emulator.policy import parse_policy
from harness.emulator.registry import Registry
from tests.test_registry_kit import ACCOUNT, REGION, device_pem, make_registry

ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}:"


def _doc(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def _allow(action: str, resource: str) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource}


CLAIM = _doc(_allow("iot:Connect", "*"),
             _allow("iot:Publish", f"{ARN}topic/$aws/certificates/create/*"),
             _allow("iot:Receive", f"{ARN}topic/$aws/certificates/create/*"))
THING_TOPICS = _doc(_allow("iot:Connect", "*"),
                    _allow("iot:Publish", f"{ARN}topic/things/${{iot:Connection.Thing.ThingName}}"
                                          "/${iot:Connection.Thing.Attributes[floor]}/*"))


class Fleet:
    """A registry, an Authentication wired to its events, and certificates to connect with."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.auth = Authentication(registry, BrokerSettings(), region=REGION, account_id=ACCOUNT)
        registry.add_listener(self._event)

    def _event(self, event: Any) -> None:  # what Broker._registry_event does, on the loop
        reaction = self.auth.reaction(event)
        if reaction.invalidate:
            self.auth.invalidate(reaction.invalidate_certificates, reaction.invalidate_things)

    def certificate(self, *policies: str) -> tuple[str, str, x509.Certificate]:
        """(certificate id, ARN, parsed certificate) of a new ACTIVE certificate."""
        pem = device_pem(common_name="cache device")
        made = self.registry.register_certificate_without_ca(certificate_pem=pem,
                                                             status="ACTIVE")
        for name in policies:
            self.registry.attach_policy(policy_name=name, target=made.certificate_arn)
        return made.certificate_id, made.certificate_arn, pki.load_certificate(pem)

    def connect(self, certificate: tuple[str, str, x509.Certificate],
                client_id: str) -> ConnectionAuthorization:
        cert_id, _, parsed = certificate
        return self.auth.authorization(Principal(cert_id, parsed), client_id, source_ip=None,
                                       domain_name=None, connect_attributes=frozenset())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    registry = make_registry(tmp_path / "registry.db", policy_parser=parse_policy)
    yield Fleet(registry)
    registry.close()


def test_claim_connections_share_one_prepared_policy_and_its_decisions(fleet: Fleet) -> None:
    # spec broker §3.4: the same policy set and no per-device variables: one set of decisions
    fleet.registry.create_policy(policy_name="claim", policy_document=CLAIM)
    claim = fleet.certificate("claim")
    first, second = fleet.connect(claim, "device-1"), fleet.connect(claim, "device-2")
    assert first.can_connect() and second.can_connect()
    assert first.can_publish("$aws/certificates/create/json")
    assert first.authorizer.decisions is second.authorizer.decisions
    cached = first.authorizer.decisions.cached
    assert second.can_publish("$aws/certificates/create/json")  # decided once for both
    assert not second.can_publish("elsewhere")
    assert first.authorizer.decisions.cached == cached + 1


def test_a_new_default_policy_version_changes_a_cached_decision(fleet: Fleet) -> None:
    # spec broker §1.9, §5.3: CreatePolicyVersion(setAsDefault) and SetDefaultPolicyVersion
    registry = fleet.registry
    registry.create_policy(policy_name="claim", policy_document=CLAIM)
    conn = fleet.connect(fleet.certificate("claim"), "device-1")
    assert conn.can_publish("$aws/certificates/create/json")
    registry.create_policy_version(policy_name="claim", set_as_default=True,
                                   policy_document=_doc(_allow("iot:Connect", "*")))
    assert not conn.can_publish("$aws/certificates/create/json")
    registry.set_default_policy_version(policy_name="claim", policy_version_id="1")
    assert conn.can_publish("$aws/certificates/create/json")


def test_detaching_and_attaching_a_policy_changes_a_cached_decision(fleet: Fleet) -> None:
    # spec broker §1.9, §3.4: DetachPolicy / AttachPolicy on the connection's certificate
    registry = fleet.registry
    registry.create_policy(policy_name="claim", policy_document=CLAIM)
    cert = fleet.certificate("claim")
    conn = fleet.connect(cert, "device-1")
    assert conn.can_receive("$aws/certificates/create/json/accepted")
    registry.detach_policy(policy_name="claim", target=cert[1])
    assert not conn.can_receive("$aws/certificates/create/json/accepted")
    registry.attach_policy(policy_name="claim", target=cert[1])
    assert conn.can_receive("$aws/certificates/create/json/accepted")


def test_a_thing_attribute_in_a_policy_variable_follows_updates(fleet: Fleet) -> None:
    # spec broker §3.5: ${iot:Connection.Thing.Attributes[...]} with the thing of §3.4
    registry = fleet.registry
    registry.create_policy(policy_name="things", policy_document=THING_TOPICS)
    cert = fleet.certificate("things")
    registry.create_thing(thing_name="pump-1", attribute_payload={"attributes": {"floor": "3"}})
    conn = fleet.connect(cert, "pump-1")
    assert not conn.can_publish("things/pump-1/3/state")  # not attached: no thing variables
    registry.attach_thing_principal(thing_name="pump-1", principal=cert[1])
    assert conn.can_publish("things/pump-1/3/state")
    registry.update_thing(thing_name="pump-1", attribute_payload={"attributes": {"floor": "4"}})
    assert not conn.can_publish("things/pump-1/3/state")
    assert conn.can_publish("things/pump-1/4/state")
    registry.detach_thing_principal(thing_name="pump-1", principal=cert[1])
    assert not conn.can_publish("things/pump-1/4/state")


def test_an_exclusive_thing_of_another_name_is_watched_too(fleet: Fleet) -> None:
    # spec broker §3.4: an exclusively attached thing is the connection's whatever its
    # client id; an update of that thing reaches the connection's cached decisions
    registry = fleet.registry
    registry.create_policy(policy_name="things", policy_document=THING_TOPICS)
    cert = fleet.certificate("things")
    registry.create_thing(thing_name="pump-9", attribute_payload={"attributes": {"floor": "1"}})
    registry.attach_thing_principal(thing_name="pump-9", principal=cert[1],
                                    thing_principal_type="EXCLUSIVE_THING")
    conn = fleet.connect(cert, "any-client-id")
    assert conn.can_publish("things/pump-9/1/state")
    assert conn.exclusive_thing_name == "pump-9"
    registry.update_thing(thing_name="pump-9", attribute_payload={"attributes": {"floor": "2"}})
    assert not conn.can_publish("things/pump-9/1/state")
    assert conn.can_publish("things/pump-9/2/state")


def test_a_thing_group_policy_applies_once_the_thing_joins_the_group(fleet: Fleet) -> None:
    # spec broker §3.4: the policies of the connection's thing's groups
    registry = fleet.registry
    registry.create_policy(policy_name="connect", policy_document=_doc(_allow("iot:Connect", "*")))
    registry.create_policy(policy_name="group",
                           policy_document=_doc(_allow("iot:Publish", f"{ARN}topic/group/*")))
    group = registry.create_thing_group(thing_group_name="floor-3")
    registry.attach_policy(policy_name="group", target=group.thing_group_arn)
    cert = fleet.certificate("connect")
    registry.create_thing(thing_name="pump-2")
    registry.attach_thing_principal(thing_name="pump-2", principal=cert[1])
    conn = fleet.connect(cert, "pump-2")
    assert not conn.can_publish("group/x")
    registry.add_thing_to_thing_group(thing_group_name="floor-3", thing_name="pump-2")
    assert conn.can_publish("group/x")
    registry.remove_thing_from_thing_group(thing_group_name="floor-3", thing_name="pump-2")
    assert not conn.can_publish("group/x")


def test_an_event_about_one_certificate_leaves_other_connections_built(fleet: Fleet) -> None:
    # the invalidation is scoped: RegisterThing for one device does not rebuild every claim
    registry = fleet.registry
    registry.create_policy(policy_name="claim", policy_document=CLAIM)
    registry.create_policy(policy_name="device", policy_document=_doc(_allow("iot:*", "*")))
    claim = fleet.certificate("claim")
    watcher = fleet.connect(claim, "device-1")
    built = watcher.authorizer
    new_device = fleet.certificate()
    registry.create_thing(thing_name="device-2")
    registry.attach_policy(policy_name="device", target=new_device[1])
    registry.attach_thing_principal(thing_name="device-2", principal=new_device[1])
    assert watcher.authorizer is built
    registry.create_thing(thing_name="device-1")  # its client id: looked at again
    assert watcher.authorizer is not built
    rebuilt = watcher.authorizer
    registry.create_policy_version(policy_name="device", set_as_default=True,
                                   policy_document=_doc(_allow("iot:Connect", "*")))
    assert watcher.authorizer is not rebuilt  # no name in the event: every connection


def test_certificate_status_decides_admission_of_live_connections(fleet: Fleet) -> None:
    # spec broker §2.3: a certificate that leaves ACTIVE is no longer admitted
    registry = fleet.registry
    registry.create_policy(policy_name="claim", policy_document=CLAIM)
    cert = fleet.certificate("claim")
    conn = fleet.connect(cert, "device-1")
    assert conn.can_connect()
    assert fleet.auth.still_admitted(conn.principal, 0.0)
    registry.update_certificate(certificate_id=cert[0], new_status="INACTIVE")
    assert not fleet.auth.still_admitted(conn.principal, 0.0)
    registry.update_certificate(certificate_id=cert[0], new_status="ACTIVE")
    assert fleet.auth.still_admitted(conn.principal, 0.0)


def test_too_many_scoped_invalidations_fall_back_to_everyone(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.emulator import auth as auth_module

    monkeypatch.setattr(auth_module, "INVALIDATION_STAMPS", 4)
    fleet.registry.create_policy(policy_name="claim", policy_document=CLAIM)
    conn = fleet.connect(fleet.certificate("claim"), "device-1")
    fleet.auth.invalidate()  # everyone: no stamps left
    built = conn.authorizer
    for i in range(4):
        fleet.auth.invalidate(things=[f"other-{i}"])
    assert conn.authorizer is built
    fleet.auth.invalidate(things=["other-4"])  # the stamps overflow: treated as everyone
    assert conn.authorizer is not built

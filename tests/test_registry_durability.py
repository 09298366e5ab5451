"""Durability, transactions and events of the registry (design principle 5; task brief)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from harness import pki
from harness.clock import Clock
from harness.emulator.registry import CertificateStatus, Registry, RegistrySettings
from harness.errors import (
    InvalidRequestException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
)
from tests.test_registry_kit import (  # noqa: F401  (fixtures path and registry)
    ACCOUNT,
    ALLOW_ALL,
    REGION,
    EventLog,
    device_pem,
    emulator_ca,
    file_registry,
    make_ca_pem,
    make_registry,
    registry_file,
    reopen,
    self_signed_pem,
    verification_pem,
)


def _populate(registry: Registry) -> None:
    """At least one record of every table."""
    cert = registry.create_certificate_from_csr(
        certificate_signing_request=pki.make_csr(pki.generate_ec_key()), set_as_active=True)
    ca, pem = make_ca_pem("Durable CA")
    code = registry.get_registration_code().registration_code
    registry.register_ca_certificate(ca_certificate=pem, set_as_active=True,
                                     verification_certificate=verification_pem(ca, code),
                                     tags=[{"Key": "k", "Value": "v"}])
    registry.register_certificate(certificate_pem=device_pem(ca))
    registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    registry.create_policy_version(policy_name="p", policy_document=ALLOW_ALL)
    registry.attach_policy(policy_name="p", target=cert.certificate_arn)
    registry.create_thing_type(thing_type_name="kind",
                               thing_type_properties={"searchableAttributes": ["a"]})
    registry.create_billing_group(billing_group_name="bg")
    registry.create_thing(thing_name="t", thing_type_name="kind", billing_group_name="bg",
                          attribute_payload={"attributes": {"a": "1"}})
    registry.attach_thing_principal(thing_name="t", principal=cert.certificate_arn,
                                    thing_principal_type="EXCLUSIVE_THING")
    registry.create_thing_group(thing_group_name="g")
    registry.add_thing_to_thing_group(thing_group_name="g", thing_name="t")
    registry.create_provisioning_template(
        template_name="tmpl", template_body="{}", provisioning_role_arn="a" * 20,
        pre_provisioning_hook={"targetArn": "arn:aws:lambda:us-east-1:1:function:f"})
    registry.create_provisioning_template_version(template_name="tmpl", template_body="{}")


def test_every_acknowledged_write_survives_close_and_reopen(registry: Registry, path: Path
                                                            ) -> None:
    # design principle 5: an acknowledged write is never lost
    _populate(registry)
    before = registry.dump()
    assert all(before.values()), [name for name, rows in before.items() if not rows]
    again = reopen(registry, path)
    assert again.dump() == before
    assert again.trust_anchors_pem() == registry.trust_anchors_pem()
    again.close()


def test_the_file_is_wal_with_a_schema_version(registry: Registry, path: Path) -> None:
    # task brief: WAL, synchronous=FULL by default, PRAGMA user_version
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    db.execute("PRAGMA user_version=999")
    db.commit()
    db.close()
    registry.close()
    with pytest.raises(RuntimeError, match="newer"):
        make_registry(path)
    fresh = make_registry(path.with_name("other.db"))
    fresh.close()


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from harness import pki
    from harness.clock import Clock
    from harness.emulator.registry import Registry, RegistrySettings

    registry = Registry(Path(sys.argv[1]), region=sys.argv[3], account_id=sys.argv[4],
                        clock=Clock(), ca=pki.CertificateAuthority.create(),
                        settings=RegistrySettings(synchronous=sys.argv[2]))
    doc = '{"Version": "2012-10-17", "Statement": []}'
    n = 0
    while True:
        if n % 3 == 0:
            with registry.transaction() as tx:
                tx.create_thing(thing_name=f"t{n}")
                tx.create_policy(policy_name=f"p{n}", policy_document=doc)
        else:
            registry.create_thing(thing_name=f"t{n}")
        print(n, flush=True)
        n += 1
""")


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_writes_acknowledged_before_a_sigkill_survive(tmp_path: Path, synchronous: str) -> None:
    # design principle 5: killing the emulator never loses an acknowledged write;
    # a transaction is all or nothing (RegisterThing's resources)
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT)
    db = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, str(script), str(db), synchronous, REGION, ACCOUNT],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert proc.stdout is not None
    acknowledged = []
    for line in proc.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) >= 40:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    registry = make_registry(db)
    try:
        for n in acknowledged:
            registry.describe_thing(thing_name=f"t{n}")
        things = registry.dump()["things"]
        policies = registry.dump()["policies"]
        for name in things:
            n = int(name[1:])
            assert (n % 3 == 0) == (f"p{n}" in policies)  # never half a transaction
        assert len(policies) == len([t for t in things if int(t[1:]) % 3 == 0])
    finally:
        registry.close()


def test_a_failed_transaction_leaves_no_trace(registry: Registry, path: Path) -> None:
    # task brief: rollback leaves no thing, policy or attachment; memory and disk agree
    cert = registry.register_certificate_without_ca(certificate_pem=self_signed_pem())
    before = registry.dump()
    events = EventLog()
    registry.add_listener(events)
    with pytest.raises(ResourceAlreadyExistsException), registry.transaction() as tx:
        tx.create_thing(thing_name="t", attribute_payload={"attributes": {"a": "1"}})
        tx.attach_thing_principal(thing_name="t", principal=cert.certificate_arn)
        tx.create_policy(policy_name="p", policy_document=ALLOW_ALL)
        tx.attach_policy(policy_name="p", target=cert.certificate_arn)
        tx.update_certificate(certificate_id=cert.certificate_id, new_status="ACTIVE")
        tx.create_thing(thing_name="t", attribute_payload={"attributes": {"a": "2"}})
    assert registry.dump() == before
    assert events.events == []
    with pytest.raises(ResourceNotFoundException):
        registry.describe_thing(thing_name="t")
    described = registry.describe_certificate(certificate_id=cert.certificate_id)
    assert described.certificate_description.status is CertificateStatus.INACTIVE
    again = reopen(registry, path)
    assert again.dump() == before
    again.close()


def test_a_transaction_is_invisible_to_other_threads_until_it_commits(registry: Registry) -> None:
    # task brief: memory updated only after commit, events fired after commit
    events = EventLog()
    registry.add_listener(events)
    seen_inside: list[object] = []

    def look() -> None:
        try:
            seen_inside.append(registry.describe_thing(thing_name="t"))
        except ResourceNotFoundException as exc:
            seen_inside.append(exc)

    with registry.transaction() as tx:
        tx.create_thing(thing_name="t")
        assert tx.describe_thing(thing_name="t").thing_name == "t"  # own writes visible
        reader = threading.Thread(target=look)
        reader.start()
        reader.join(timeout=10)
        assert events.events == []
    assert isinstance(seen_inside[0], ResourceNotFoundException)
    assert registry.describe_thing(thing_name="t").version == 1
    assert events.kinds() == ["thing_changed"]


def test_an_operation_that_fails_inside_a_transaction_rolls_back_alone(registry: Registry
                                                                       ) -> None:
    # each operation is a savepoint: a caught failure keeps the rest of the transaction
    registry.create_thing(thing_name="t")
    registry.create_thing_group(thing_group_name="g")
    registry.add_thing_to_thing_group(thing_group_name="g", thing_name="t")
    with registry.transaction() as tx:
        tx.create_thing(thing_name="kept")
        with pytest.raises(ResourceNotFoundException):
            # removes t from g, then fails on the missing group: the removal is undone
            tx.update_thing_groups_for_thing(thing_name="t", thing_groups_to_remove=["g"],
                                             thing_groups_to_add=["missing"])
    assert registry.list_things_in_thing_group(thing_group_name="g").things == ["t"]
    assert registry.describe_thing(thing_name="kept").thing_name == "kept"


def test_nested_transactions_are_savepoints(registry: Registry) -> None:
    with registry.transaction() as outer:
        outer.create_thing(thing_name="a")
        with pytest.raises(RuntimeError), outer.transaction() as inner:
            inner.create_thing(thing_name="b")
            raise RuntimeError("inner fails")
        outer.create_thing(thing_name="c")
    assert [t.thing_name for t in registry.list_things().things] == ["a", "c"]


def test_concurrent_writers_are_serialised_and_all_durable(registry: Registry, path: Path
                                                           ) -> None:
    # writes are called from executor threads
    def write(prefix: str) -> None:
        for n in range(20):
            registry.create_thing(thing_name=f"{prefix}-{n}")

    threads = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(registry.dump()["things"]) == 80
    again = reopen(registry, path)
    assert len(again.dump()["things"]) == 80
    again.close()


def test_listeners_hear_each_commit_in_order_and_a_failing_listener_is_contained(
        registry: Registry) -> None:
    # task brief: add_listener, called after each commit in the writer's thread
    threads: list[str] = []

    def broken(_event: object) -> None:
        raise ValueError("listener bug")

    events = EventLog()
    registry.add_listener(broken)
    registry.add_listener(events)
    registry.add_listener(lambda _e: threads.append(threading.current_thread().name))
    cert = registry.register_certificate_without_ca(certificate_pem=self_signed_pem())
    registry.create_thing(thing_name="t")
    registry.update_thing(thing_name="t", attribute_payload={"attributes": {"a": "b"}})
    registry.update_certificate(certificate_id=cert.certificate_id, new_status="ACTIVE")
    assert events.kinds() == ["certificate_status", "trust_changed", "thing_changed",
                              "thing_changed", "certificate_status"]
    assert set(threads) == {threading.current_thread().name}
    registry.remove_listener(events)
    registry.delete_thing(thing_name="t")
    assert len(events.events) == 5


def test_reset_empties_the_account_on_disk_too(registry: Registry, path: Path) -> None:
    # admin API reset
    _populate(registry)
    events = EventLog()
    registry.add_listener(events)
    registry.reset()
    assert events.kinds() == ["reset", "trust_changed"]
    assert not any(registry.dump().values())
    assert registry.trust_anchors_pem() == [emulator_ca().pem]
    with registry.transaction(), pytest.raises(RuntimeError):
        registry.reset()
    again = reopen(registry, path)
    assert not any(again.dump().values())
    again.close()


def test_invalid_input_changes_nothing(registry: Registry) -> None:
    # design principle 6: bad input gets a clear error and changes nothing
    before = registry.dump()
    with pytest.raises(InvalidRequestException):
        registry.create_thing(thing_name="bad/name")
    with pytest.raises(TypeError):
        registry.create_thing(thing_name="t", colour="red")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        registry.create_thing("t")  # type: ignore[misc]
    assert registry.dump() == before


def test_synchronous_mode_is_a_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_registry(tmp_path / "x.db", settings=RegistrySettings(synchronous="OFF"))
    reg = make_registry(tmp_path / "n.db", settings=RegistrySettings(synchronous="NORMAL"))
    reg.create_thing(thing_name="t")
    reg.close()


def test_registry_works_as_a_context_manager(path: Path) -> None:
    with Registry(path, region=REGION, account_id=ACCOUNT, clock=Clock(),
                  ca=emulator_ca()) as reg:
        reg.create_thing(thing_name="t")
    with make_registry(path) as again:
        assert again.describe_thing(thing_name="t").thing_name == "t"

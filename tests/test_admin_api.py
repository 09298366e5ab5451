"""The emulator-only admin API (``/_fleetbench/``) through :class:`AdminClient`.

Spec: iot-broker-and-policy.md §5 (same error shape); design.md principle 1
(emulator-only extensions: full event trace, moving the clock, hooks, reset).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import boto3
import pytest
from botocore.config import Config

from harness import errors
from harness.admin_client import AdminApiError, AdminClient
from harness.clock import Clock
from harness.emulator.admin import AdminState
from harness.emulator.controlplane import BackgroundServer, build_app
from harness.observations import Kind, ObservationLog

TOKEN = "admin-token"


class Backend:
    def describe_thing(self, thing_name: str) -> None:
        raise errors.ResourceNotFoundException(f"Thing {thing_name} cannot be found.")


@dataclass
class Emulated:
    """The state the admin routes act on, as an emulator would wire it."""

    clock: Clock = field(default_factory=Clock)
    hooks: dict[str, str] = field(default_factory=dict)
    resets: threading.Event = field(default_factory=threading.Event)
    advanced_in: list[str] = field(default_factory=list)
    log: ObservationLog = field(init=False)

    def __post_init__(self) -> None:
        self.log = ObservationLog(self.clock)
        self.clock.on_advance(lambda _now: self.advanced_in.append(
            threading.current_thread().name))

    def set_hooks(self, mapping: Mapping[str, str]) -> None:
        self.hooks = dict(mapping)

    def state(self) -> AdminState:
        return AdminState(observations=self.log, clock=self.clock,
                          get_hooks=lambda: self.hooks, set_hooks=self.set_hooks,
                          reset=self.resets.set)


@dataclass
class Running:
    url: str
    emulated: Emulated
    server: BackgroundServer


def _serve(api_token: str | None = None) -> Generator[Running, None, None]:
    emulated = Emulated()
    with ThreadPoolExecutor(2, thread_name_prefix="backend") as executor:
        app = build_app(Backend(), admin=emulated.state(), api_token=api_token,
                        executor=executor)
        with BackgroundServer(app) as server:
            yield Running(server.url, emulated, server)


@pytest.fixture
def running() -> Iterator[Running]:
    yield from _serve()


@pytest.fixture
def admin(running: Running) -> AdminClient:
    return AdminClient(running.url)


def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True


def test_events_are_filtered_by_client_certificate_kind_and_since(running: Running,
                                                                  admin: AdminClient) -> None:
    log = running.emulated.log
    first = log.record(Kind.CONNECT, client_id="dev-1", certificate_id="c1", ip="127.0.0.1")
    log.record(Kind.CONNECT, client_id="dev-2", certificate_id="c2")
    log.record(Kind.PUBLISH, client_id="dev-1", certificate_id="c1", topic="a/b")
    log.record(Kind.DISCONNECT, client_id="dev-1", certificate_id="c1", reason="CLIENT_INITIATED")

    everything = admin.events_page()
    assert [e.seq for e in everything.events] == [1, 2, 3, 4]
    assert everything.last_seq == 4
    assert everything.events[0] == first  # the same record, rebuilt on the harness side
    assert [e.kind for e in admin.events(client_id="dev-1")] == [
        "connect", "publish", "disconnect"]
    assert [e.client_id for e in admin.events(certificate_id="c2")] == ["dev-2"]
    assert [e.kind for e in admin.events(kinds=[Kind.PUBLISH, "disconnect"])] == [
        "publish", "disconnect"]
    assert [e.seq for e in admin.events(client_id="dev-1", since=1)] == [3, 4]
    limited = admin.events_page(limit=2)
    assert ([e.seq for e in limited.events], limited.last_seq) == ([1, 2], 2)


def test_long_poll_returns_when_another_thread_records(running: Running,
                                                       admin: AdminClient) -> None:
    log = running.emulated.log
    log.record(Kind.CONNECT, client_id="early")
    since = admin.events_page().last_seq
    recorder = threading.Timer(0.2, lambda: log.record(Kind.THING_REGISTERED, client_id="late",
                                                       thingName="late-thing"))
    recorder.start()
    started = time.monotonic()
    page = admin.events_page(since=since, kinds=[Kind.THING_REGISTERED], wait=10.0)
    recorder.join(5)
    assert time.monotonic() - started < 5.0
    assert [(e.client_id, dict(e.detail)) for e in page.events] == [
        ("late", {"thingName": "late-thing"})]
    assert page.last_seq >= page.events[0].seq


def test_long_poll_without_a_match_times_out_empty(running: Running,
                                                   admin: AdminClient) -> None:
    running.emulated.log.record(Kind.CONNECT, client_id="other")
    page = admin.events_page(client_id="nobody", wait=0.3)
    assert page.events == []
    assert page.last_seq == 1  # nothing up to here matched: resume from it


def test_stopping_the_server_ends_a_pending_long_poll() -> None:
    serving = _serve()
    running = next(serving)
    outcome: list[object] = []

    def poll() -> None:
        try:
            outcome.append(AdminClient(running.url).events(client_id="never", wait=60.0))
        except Exception as exc:
            outcome.append(exc)

    poller = threading.Thread(target=poll)
    poller.start()
    assert _until(lambda: bool(running.emulated.log._waiters))  # the poll is parked
    started = time.monotonic()
    serving.close()  # stops the server
    poller.join(10)
    assert not poller.is_alive()
    assert time.monotonic() - started < 5.0
    assert outcome == [[]]


def test_clock_reads_and_advances(running: Running, admin: AdminClient) -> None:
    before = admin.clock()
    assert before.offset == 0.0
    after = admin.advance(3600)
    assert after.offset == 3600.0
    assert after.now >= before.now + 3600
    assert running.emulated.clock.offset == 3600.0
    # expiry listeners run in the executor, never on the event loop
    assert running.emulated.advanced_in and running.emulated.advanced_in[0].startswith("backend")
    with pytest.raises(AdminApiError) as caught:
        admin.advance(-1)
    assert (caught.value.status, caught.value.code) == (400, "InvalidRequestException")
    assert running.emulated.clock.offset == 3600.0


def test_hooks_are_read_and_replaced(running: Running, admin: AdminClient) -> None:
    arn = "arn:aws:lambda:us-east-1:123456789012:function:pre-provision"
    assert admin.hooks() == {}
    assert admin.set_hooks({arn: "python:scenarios.hooks:allow_all"}) == {
        arn: "python:scenarios.hooks:allow_all"}
    assert admin.hooks() == {arn: "python:scenarios.hooks:allow_all"}
    assert running.emulated.hooks == {arn: "python:scenarios.hooks:allow_all"}
    with pytest.raises(AdminApiError) as caught:
        admin.set_hooks({arn: 5})  # type: ignore[dict-item]
    assert caught.value.code == "InvalidRequestException"


def test_reset_calls_the_reset_callable(running: Running, admin: AdminClient) -> None:
    admin.reset()
    assert running.emulated.resets.wait(5)


def test_control_plane_calls_are_observed(running: Running, admin: AdminClient) -> None:
    iot = boto3.client("iot", endpoint_url=running.url, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="y",
                       config=Config(retries={"total_max_attempts": 1}))
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_thing(thingName="absent")
    [event] = admin.events(kinds=[Kind.CONTROL_PLANE])
    assert dict(event.detail) == {"operation": "DescribeThing", "status": 404,
                                  "errorCode": "ResourceNotFoundException"}


def test_admin_api_requires_the_token_when_one_is_set() -> None:
    serving = _serve(api_token=TOKEN)
    running = next(serving)
    try:
        with pytest.raises(AdminApiError) as caught:
            AdminClient(running.url).clock()
        assert (caught.value.status, caught.value.code) == (
            403, "MissingAuthenticationTokenException")
        with pytest.raises(AdminApiError) as wrong:
            AdminClient(running.url, api_token="guess").reset()
        assert wrong.value.code == "UnrecognizedClientException"
        assert not running.emulated.resets.is_set()
        assert AdminClient(running.url, api_token=TOKEN).clock().offset == 0.0
    finally:
        serving.close()


def test_without_admin_state_the_prefix_is_not_routed() -> None:
    with ThreadPoolExecutor(1) as executor, BackgroundServer(
            build_app(Backend(), executor=executor)) as server, \
            pytest.raises(AdminApiError) as caught:
        AdminClient(server.url).clock()
    assert (caught.value.status, caught.value.code) == (404, "UnknownOperationException")

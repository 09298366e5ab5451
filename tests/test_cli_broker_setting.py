"""`fleetbench emulator --broker-setting NAME=VALUE` sets one BrokerSettings field."""

from __future__ import annotations

import pytest

from harness.cli import build_parser
from harness.emulator.broker_settings import BrokerSettings, RefusalPoint


def parse(*argv: str) -> dict[str, object]:
    args = build_parser().parse_args(["emulator", *argv])
    return dict(args.broker_setting)


def test_values_are_json_and_become_the_fields_types() -> None:
    overrides = parse(
        "--broker-setting", "publish_rate_per_connection=null",
        "--broker-setting", "max_filters_per_subscribe=16",
        "--broker-setting", "refuse_certificates_at=handshake",
        "--broker-setting", "explain_refusals=true",
        "--broker-setting", 'sni_host_names=["iot.example.com"]',
    )
    settings = BrokerSettings(**overrides)  # type: ignore[arg-type]
    assert settings.publish_rate_per_connection is None
    assert settings.max_filters_per_subscribe == 16
    assert settings.refuse_certificates_at is RefusalPoint.HANDSHAKE
    assert settings.explain_refusals is True
    assert settings.sni_host_names == ("iot.example.com",)


@pytest.mark.parametrize(
    "bad", ["no_such_setting=1", "explain_refusals", "refuse_certificates_at=x"]
)
def test_an_unknown_or_malformed_setting_is_bad_usage(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--broker-setting", bad)
    assert exit_info.value.code == 2
    assert "--broker-setting" in capsys.readouterr().err


def test_key_pool_options_reach_the_emulator_config() -> None:
    # issue 3: the key pool's refill rate bounds CreateKeysAndCertificate
    args = build_parser().parse_args(
        ["emulator", "--key-pool-size", "8", "--key-pool-workers", "2"])
    assert (args.key_pool_size, args.key_pool_workers) == (8, 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["emulator", "--key-pool-workers", "0"])

"""AWS IoT topic rules and subscription matching.

Spec: iot-broker-and-policy.md §1.5 and §7 items 7, 8.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.emulator.mqtt.topics import (
    SubscriptionTree,
    TopicError,
    TopicLimits,
    split_shared,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

# ---------------------------------------------------------------------------
# Topic names
# ---------------------------------------------------------------------------


# spec broker §1.5: UTF-8, case-sensitive, levels separated by '/'; empty levels allowed
@pytest.mark.parametrize("name", [
    "a", "a/b", "/", "a/", "//", "a b/c", "Ünïcode/ü", "$aws/things/thing-1/shadow/update",
    "$aws/things/t/shadow/name/s/update/documents",  # the longest AWS topics: 7 slashes
])
def test_valid_topic_names_are_accepted(name: str) -> None:
    validate_topic_name(name)


# spec broker §1.5: publishing to a name with '+' or '#' is invalid; empty names invalid
@pytest.mark.parametrize("name", ["", "a/+", "a/#", "+", "#", "a+b", "a#", "a\x00b"])
def test_invalid_topic_names_are_refused_with_0x90(name: str) -> None:
    with pytest.raises(TopicError) as info:
        validate_topic_name(name)
    assert info.value.reason_code == 0x90


# spec broker §1.5 / edge case 8: at most 256 bytes (of UTF-8) and 7 slashes
@pytest.mark.parametrize(("name", "ok"), [
    ("x" * 256, True),
    ("x" * 257, False),
    ("é" * 128, True),  # 256 bytes
    ("é" * 128 + "x", False),  # 257 bytes, 129 characters
    ("a/" * 7 + "a", True),
    ("a/" * 8 + "a", False),
    ("/" * 7, True),
    ("/" + "a/" * 7, False),  # a leading slash counts
    ("$aws/things/t/shadow/name/s/update/documents/x", False),  # other $aws topics count in full
])
def test_topic_name_size_and_slash_limits(name: str, ok: bool) -> None:
    if ok:
        validate_topic_name(name)
    else:
        with pytest.raises(TopicError):
            validate_topic_name(name)


# spec broker §1.5 / edge case 8: the Basic Ingest prefix $aws/rules/<rule>/ is not counted
@pytest.mark.parametrize(("name", "ok"), [
    ("$aws/rules/my_rule/" + "a/" * 7 + "a", True),
    ("$aws/rules/my_rule/" + "a/" * 8 + "a", False),
    ("$aws/rules/my_rule/" + "x" * 256, True),
    ("$aws/rules/my_rule/" + "x" * 257, False),
    ("$aws/rules/" + "r" * 300, False),  # no third slash: no prefix to exempt
])
def test_basic_ingest_prefix_is_not_counted(name: str, ok: bool) -> None:
    if ok:
        validate_topic_name(name)
    else:
        with pytest.raises(TopicError):
            validate_topic_name(name)


# spec broker §1.8 / edge case 24: limits are configurable
def test_topic_limits_are_configurable() -> None:
    validate_topic_name("a/b/c", TopicLimits(max_bytes=5, max_slashes=2))
    with pytest.raises(TopicError):
        validate_topic_name("a/b/c/", TopicLimits(max_bytes=10, max_slashes=2))
    with pytest.raises(TopicError):
        validate_topic_filter("abcdef", TopicLimits(max_bytes=5))


# ---------------------------------------------------------------------------
# Topic filters
# ---------------------------------------------------------------------------


# spec broker §1.5: '+' alone in a level, '#' alone in the last level
@pytest.mark.parametrize("topic_filter", [
    "a", "a/+", "+", "#", "a/#", "+/+/#", "/+", "+/", "$aws/events/#", "$share/g/a/#",
    "$share/group-1/+", "$share/" + "g" * 128 + "/a",
])
def test_valid_topic_filters_are_accepted(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


# spec broker §1.5: wildcards only as whole levels; ShareName rules; empty filters invalid
@pytest.mark.parametrize("topic_filter", [
    "", "a/b#", "a/#/b", "#/a", "a+", "a/+b", "a/++", "##", "a\x00",
    "$share/g", "$share/g/", "$share//a", "$share/g+/a", "$share/g#/a",
    "$share/" + "g" * 129 + "/a", "$share/g/a/#/b",
])
def test_invalid_topic_filters_are_refused_with_0x8f(topic_filter: str) -> None:
    with pytest.raises(TopicError) as info:
        validate_topic_filter(topic_filter)
    assert info.value.reason_code == 0x8F


# spec broker §1.5 / edge case 8: $share/<name>/ is not counted, the rest is
@pytest.mark.parametrize(("topic_filter", "ok"), [
    ("$share/group/" + "a/" * 7 + "#", True),
    ("$share/group/" + "a/" * 8 + "#", False),
    ("$share/group/" + "x" * 256, True),
    ("$share/group/" + "x" * 257, False),
    ("a/" * 7 + "#", True),
    ("a/" * 8 + "#", False),
    ("x" * 257, False),
    ("$share/g/$aws/rules/r/" + "a/" * 7 + "a", True),
])
def test_topic_filter_size_and_slash_limits(topic_filter: str, ok: bool) -> None:
    if ok:
        validate_topic_filter(topic_filter)
    else:
        with pytest.raises(TopicError):
            validate_topic_filter(topic_filter)


# spec broker §1.5: shared subscriptions are $share/<ShareName>/<filter>
@pytest.mark.parametrize(("topic_filter", "expected"), [
    ("$share/group/a/b", ("group", "a/b")),
    ("$share/group/#", ("group", "#")),
    ("$share/group", ("group", "")),
    ("a/b", (None, "a/b")),
    ("$share", (None, "$share")),
    ("$sharex/g/a", (None, "$sharex/g/a")),
])
def test_split_shared(topic_filter: str, expected: tuple[str | None, str]) -> None:
    assert split_shared(topic_filter) == expected


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------

MATCH_TABLE = [
    # spec broker §1.5 / edge case 7: '#' does not match the parent level (AWS deviation)
    ("sensor/#", "sensor", False),
    ("sensor/#", "sensor/", True),
    ("sensor/#", "sensor/a", True),
    ("sensor/#", "sensor/a/b", True),
    ("+/#", "a", False),
    ("a/+/#", "a/b", False),
    ("a/+/#", "a/b/c", True),
    ("#", "a", True),
    ("#", "/", True),
    # spec broker §1.5 / edge case 7: wildcard-first filters never match '$' topics
    ("#", "$aws/events/presence/connected/c", False),
    ("+/events/#", "$aws/events/x", False),
    ("+", "$SYS", False),
    ("$aws/events/#", "$aws/events/presence/connected/c", True),
    ("$aws/+/x", "$aws/things/x", True),
    ("$share/g/#", "$aws/x", False),
    # plain MQTT rules
    ("a/+", "a/b", True),
    ("a/+", "a/", True),
    ("a/+", "a", False),
    ("a/+", "a/b/c", False),
    ("+", "a", True),
    ("+", "/a", False),
    ("+/+", "/a", True),
    ("/+", "/a", True),
    ("a/b", "a/b", True),
    ("a/b", "A/b", False),  # case-sensitive
    ("a/b", "a/b/", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("$share/g/a/+", "a/b", True),
    ("$share/g/a/+", "$share/g/a/b", False),
]


# spec broker §1.5 / edge case 7 (rows above cite the rule they check)
@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCH_TABLE)
def test_topic_matches_table(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


# spec broker §1.5 / edge case 7: the trie follows the same AWS rules
@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCH_TABLE)
def test_subscription_tree_matches_the_same_table(topic_filter: str, topic: str,
                                                  expected: bool) -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    tree.add(topic_filter, "client", 1)
    assert tree.match(topic) == ([("client", 1, topic_filter)] if expected else [])


# ---------------------------------------------------------------------------
# SubscriptionTree bookkeeping
# ---------------------------------------------------------------------------


# MQTT 3.1.1 §3.8.4: a repeated SUBSCRIBE for the same filter replaces the subscription
def test_add_reports_new_entries_and_replaces_values() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    assert tree.add("a/+", "c1", 0) is True
    assert tree.add("a/+", "c1", 1) is False  # resubscribe replaces (e.g. new QoS)
    assert tree.add("a/+", "c2", 0) is True
    assert len(tree) == 2
    assert sorted(tree.match("a/b")) == [("c1", 1, "a/+"), ("c2", 0, "a/+")]


# MQTT 5.0 §3.3.4: overlapping subscriptions of one client each match; the broker decides
def test_one_client_with_overlapping_filters_gets_each_match() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    for topic_filter in ("a/b", "a/+", "a/#", "#", "$share/g/a/b"):
        tree.add(topic_filter, "c1", 1)
    assert sorted(f for _, _, f in tree.match("a/b")) == sorted(
        ["a/b", "a/+", "a/#", "#", "$share/g/a/b"])


# MQTT 3.1.1 §3.10.4: UNSUBSCRIBE removes exactly that client's filter
def test_remove_forgets_an_entry_and_prunes_empty_levels() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    tree.add("a/+/c/#", "c1", 1)
    tree.add("a/b", "c1", 1)
    assert tree.remove("a/+/c/#", "c2") is False
    assert tree.remove("x/y", "c1") is False
    assert tree.remove("a/+/c/#", "c1") is True
    assert tree.remove("a/+/c/#", "c1") is False
    assert tree.match("a/b/c/d") == []
    assert tree.remove("a/b", "c1") is True
    assert len(tree) == 0
    assert tree._root.is_empty()  # no levels left behind by unsubscribes


# spec broker §1.5: shared and non-shared subscriptions are separate subscriptions
def test_shared_and_plain_subscriptions_of_one_client_are_distinct() -> None:
    tree: SubscriptionTree[str, str] = SubscriptionTree()
    tree.add("a/b", "c1", "plain")
    tree.add("$share/g/a/b", "c1", "shared")
    assert len(tree) == 2
    tree.remove("a/b", "c1")
    assert tree.match("a/b") == [("c1", "shared", "$share/g/a/b")]


# A literal '+' can never reach a wildcard node by lookup (no double matches)
def test_topic_with_literal_wildcard_characters_is_matched_once() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    tree.add("a/+", "c1", 1)
    assert tree.match("a/+") == [("c1", 1, "a/+")]


# ---------------------------------------------------------------------------
# Property: the trie agrees with brute force
# ---------------------------------------------------------------------------

LEVELS = ["a", "b", "", "$aws", "x"]
levels = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from([*LEVELS, "+"]), min_size=0, max_size=4))
    if draw(st.booleans()) or not parts:
        parts.append("#")
    prefix = draw(st.sampled_from(["", "", "$share/g1/", "$share/g2/"]))
    return prefix + ("/".join(parts) or "#")  # [""] would be an empty filter


topics = levels.map("/".join)


# spec broker §1.5: SubscriptionTree.match == every filter tested with topic_matches
@settings(max_examples=150, deadline=None)
@given(
    entries=st.lists(st.tuples(topic_filters(), st.sampled_from(["c1", "c2", "c3"])),
                     max_size=25),
    removals=st.lists(st.tuples(topic_filters(), st.sampled_from(["c1", "c2", "c3"])),
                      max_size=5),
    probe=st.lists(topics, min_size=1, max_size=6),
)
def test_subscription_tree_agrees_with_brute_force_topic_matches(
        entries: list[tuple[str, str]], removals: list[tuple[str, str]],
        probe: list[str]) -> None:
    tree: SubscriptionTree[str, str] = SubscriptionTree()
    reference: dict[tuple[str, str], str] = {}
    for topic_filter, key in entries:
        validate_topic_filter(topic_filter)
        assert tree.add(topic_filter, key, topic_filter + key) is ((topic_filter, key)
                                                                  not in reference)
        reference[(topic_filter, key)] = topic_filter + key
    for topic_filter, key in removals + entries[:2]:
        assert tree.remove(topic_filter, key) is ((topic_filter, key) in reference)
        reference.pop((topic_filter, key), None)
    assert len(tree) == len(reference)
    for topic in probe:
        expected = Counter((k, v, f) for (f, k), v in reference.items() if topic_matches(f, topic))
        assert Counter(tree.match(topic)) == expected

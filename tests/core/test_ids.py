from __future__ import annotations

import collections
import os
import random
import string
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kiteq.core import ids
from kiteq.core.ids import MESSAGE_ID_RE, canonical_message_id, is_message_id, new_message_id


def test_ids_are_32_lowercase_hex_characters() -> None:
    for _ in range(1000):
        value = new_message_id()
        assert len(value) == 32
        assert set(value) <= set("0123456789abcdef")
        assert is_message_id(value)


def test_a_million_ids_are_unique() -> None:
    values = {new_message_id() for _ in range(1_000_000)}
    assert len(values) == 1_000_000


def test_ids_are_unique_across_threads() -> None:
    batches: list[list[str]] = [[] for _ in range(8)]

    def draw(out: list[str]) -> None:
        out.extend(new_message_id() for _ in range(20_000))

    threads = [threading.Thread(target=draw, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = [value for batch in batches for value in batch]
    assert len(set(values)) == len(values)


def test_the_last_hex_digit_is_uniform() -> None:
    # MySQL stores shard by the last digit: 16 shards must fill evenly
    n = 160_000
    counts = collections.Counter(new_message_id()[-1] for _ in range(n))
    assert set(counts) == set("0123456789abcdef")
    expected = n / 16
    chi_squared = sum((count - expected) ** 2 / expected for count in counts.values())
    assert chi_squared < 40, counts  # 15 degrees of freedom: p < 0.001 is ~37.7


_FORK_SCRIPT = """
import os
from kiteq.core.ids import new_message_id

parent = new_message_id()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, new_message_id().encode())
    os._exit(0)
os.close(write)
child = os.read(read, 64).decode()
os.waitpid(pid, 0)
print(parent, child, new_message_id())
"""


def test_the_random_part_is_drawn_again_in_a_forked_child() -> None:
    # in a fresh interpreter: forking pytest itself (threads, gRPC) would be unsafe
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])},
        timeout=60,
    )
    parent, child, later = done.stdout.split()
    assert is_message_id(child)
    assert child[:16] != parent[:16]  # the child drew its own random part
    assert later[:16] == parent[:16]  # the parent kept its own
    assert int(later[16:], 16) == int(parent[16:], 16) + 1


def test_two_processes_draw_different_random_parts() -> None:
    script = "from kiteq.core.ids import new_message_id; print(new_message_id())"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    first, second = (
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            env=env,
            timeout=60,
        ).stdout.strip()
        for _ in range(2)
    )
    assert first[:16] != second[:16]
    assert first[:16] != new_message_id()[:16]


def test_reseeding_changes_the_prefix_and_the_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    before = new_message_id()
    monkeypatch.setattr(ids, "_prefix", ids._prefix)
    monkeypatch.setattr(ids, "_counter", ids._counter)
    ids._reseed()
    after = new_message_id()
    assert after[:16] != before[:16]
    assert int(after[16:], 16) != int(before[16:], 16) + 1


def test_the_counter_wraps_within_64_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "_counter", iter([2**64 - 1, 2**64]))
    assert new_message_id()[16:] == "f" * 16
    assert new_message_id()[16:] == "0" * 16


@pytest.mark.parametrize(
    "value",
    [
        "0123456789abcdef0123456789ABCDEF",
        "f" * 32,
        "0" * 32,
    ],
)
def test_valid_message_ids(value: str) -> None:
    assert is_message_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "0" * 31,
        "0" * 33,
        "g" * 32,
        "0" * 31 + " ",
        " " + "0" * 31,
        "0" * 31 + "\n",
        "\u0660" * 32,  # a Unicode digit, not a hex one
        "0" * 16 + "-" + "0" * 15,
    ],
)
def test_invalid_message_ids(value: str) -> None:
    assert not is_message_id(value)


def test_is_message_id_agrees_with_the_regex() -> None:
    rng = random.Random(7)
    alphabet = string.hexdigits + "xyzG- \n\u00e9\u0660"
    for _ in range(20_000):
        length = rng.choice([0, 1, 31, 32, 32, 32, 33])
        noisy = rng.random() < 0.3
        value = "".join(rng.choice(alphabet if noisy else string.hexdigits) for _ in range(length))
        assert is_message_id(value) == (MESSAGE_ID_RE.fullmatch(value) is not None), value


def test_generated_ids_are_canonical_and_every_spelling_maps_to_one() -> None:
    value = new_message_id()
    assert canonical_message_id(value) == value
    assert canonical_message_id(value.upper()) == value
    assert canonical_message_id("ABCDEF" + value[6:]) == canonical_message_id("abcdef" + value[6:])

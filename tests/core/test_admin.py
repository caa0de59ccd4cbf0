from __future__ import annotations

from kiteq.core.admin import secret_matches


def test_secret_matches_only_the_exact_secret() -> None:
    assert secret_matches("s3cret", "s3cret")
    assert secret_matches(b"s3cret", "s3cret")
    for given in ("", "s3cre", "s3cret ", "S3CRET", "s3cret\x00"):
        assert not secret_matches(given, "s3cret"), given


def test_an_empty_expected_secret_matches_nothing() -> None:
    assert not secret_matches("", "")
    assert not secret_matches("anything", "")

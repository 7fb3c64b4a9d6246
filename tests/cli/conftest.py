"""What the command's tests share: the check of an error a user can fix (status 2, `error:` on stderr, no
traceback)."""

from __future__ import annotations


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("error: "), err
    assert [fragment for fragment in fragments if fragment not in err] == []
    assert "Traceback" not in err

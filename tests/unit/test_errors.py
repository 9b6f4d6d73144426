"""The error tree: one status table, a hint on every error, documented in the README."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import hutch.errors as errors

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_error_has_a_hint_a_status_and_a_readme_row() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.HutchError)
    ]
    table = errors.status_table()
    assert set(table) == {c.__name__ for c in classes}
    for cls in classes:
        assert cls.http_status in {400, 401, 403, 404, 408, 409, 500, 503}, cls
        if cls is errors.HutchError:
            continue
        if cls is errors.ExecutionError:
            e: errors.HutchError = cls(["false"], 1, "", "")
        else:
            e = cls("something went wrong")
        assert e.hint, f"{cls.__name__} has no default hint"
        assert f"\nhint: {e.hint}" in str(e)
        assert f"`{cls.__name__}`" in README, f"{cls.__name__} is missing from README's error table"


async def test_a_home_without_setup_raises_setup_error(tmp_path: Path) -> None:
    """A real scenario: starting a box in a home `hutch setup` never prepared."""
    import hutch

    box = hutch.Box(home=tmp_path / "fresh")
    with pytest.raises(hutch.SetupError, match="hutch setup") as ei:
        await box.start()
    assert ei.value.http_status == 500 and "hutch setup" in (ei.value.message + ei.value.hint)
    assert box.state == "failed"

"""The smolvm facade's translation layers (no VM): config, errors, results."""

from __future__ import annotations

import pytest

import hutch
from hutch.compat import smolvm, translate


def test_smolvm_error_translation_follows_the_statuses() -> None:
    cases = {
        hutch.ConnectionError("x"): smolvm.ConnectionError,
        hutch.NotFoundError("x"): smolvm.NotFoundError,
        hutch.InvalidStateError("x"): smolvm.ConflictError,
        hutch.ConfigError("x"): smolvm.BadRequestError,
        hutch.ImageError("x"): smolvm.BadRequestError,
        hutch.EngineError("x"): smolvm.InternalError,
        hutch.PortalError("x"): smolvm.InternalError,
    }
    for error, expected in cases.items():
        assert type(translate(error, smolvm._ERRORS, smolvm.SmolvmError)) is expected, error
    assert not issubclass(smolvm.ExecutionError, hutch.ExecutionError)
    e = smolvm.ExecutionError(42, "out", "err")
    assert str(e).startswith("Command failed with exit code 42")


def test_smolvm_exec_result() -> None:
    ok = smolvm.ExecResult(0, "hello\n", "")
    assert ok.success and ok.assert_success() is ok and ok.output == "hello\n"
    bad = smolvm.ExecResult(3, "o", "e")
    assert bad.output == "o\ne" and repr(bad) == "ExecResult(failed(3), stdout=1b, stderr=1b)"
    with pytest.raises(smolvm.ExecutionError) as ei:
        bad.assert_success()
    assert (ei.value.exit_code, ei.value.stdout, ei.value.stderr) == (3, "o", "e")
    killed = hutch.ExecResult(command=["x"], exit_code=None, signal=9)
    assert smolvm.ExecResult.from_native(killed).exit_code == 137


def test_smolvm_config_becomes_native_options() -> None:
    assert smolvm.MachineConfig(name="n", network=True).to_native().network == "outbound"
    assert smolvm.MachineConfig(name="n").to_native().network == "none"
    with pytest.raises(smolvm.BadRequestError, match="name"):
        smolvm.MachineConfig(name="Bad Name").to_native()
    opts = smolvm.MachineConfig(
        name="m", resources=smolvm.ResourceSpec(cpus=1, memory_mb=384)
    ).to_native()
    assert (opts.name, opts.cpus, opts.memory_mib, opts.image) == ("m", 1, 384, "busybox")

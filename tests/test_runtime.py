"""Process-wide CPU allocator settings (qcalib.runtime): they take effect, and refuse
values glibc would reject."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qcalib import runtime

pytestmark = pytest.mark.skipif(runtime._glibc() is None, reason="glibc's mallopt only")

# Minor page faults of a loop that allocates and frees activation-sized tensors, after a
# warm-up, in a fresh process (the settings are process-wide) with or without them.
_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from qcalib.runtime import cpu_allocator_settings, retain_freed_cpu_memory
    if sys.argv[1] == "retain":
        assert retain_freed_cpu_memory()
    x = torch.randn(32, 16, 28, 28)
    def step():
        return x.abs().clamp_min_(1e-30).log2_().mul_(1.4).exp2_().mul_(x.sign()).sum()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, cpu_allocator_settings())
    """
)


def _faults(mode: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True,
                         capture_output=True, text=True).stdout.split(maxsplit=1)  # fmt: skip
    return int(out[0]), out[1].strip()


def test_retained_memory_stops_the_page_faults_of_a_reconstruction_like_loop():
    default, settings = _faults("default")
    retained, applied = _faults("retain")
    assert settings == "{}"
    assert applied == str({"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30})
    one_tensor = 32 * 16 * 28 * 28 * 4 // 4096  # pages of one activation: 392
    # The default thresholds give memory back and fault it in again, step after step
    # (glibc's adaptive mmap threshold catches up later than 3 warm-up steps: 1144 to
    # 15040 faults over 20 runs here).
    assert default >= 2 * one_tensor
    # Retained: at most one late growth of the heap (0 or 392 here), never a fault per step.
    assert retained <= one_tensor


def test_retain_freed_cpu_memory_refuses_values_glibc_would_reject():
    with pytest.raises(ValueError, match="32 MiB|33554432"):
        runtime.retain_freed_cpu_memory(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match="trim_threshold"):
        runtime.retain_freed_cpu_memory(trim_threshold=0)


def test_the_qcalib_command_retains_freed_memory_before_running(monkeypatch, tmp_path, capsys):
    import qcalib.cli

    calls = []
    monkeypatch.setattr(qcalib.cli, "retain_freed_cpu_memory", lambda: calls.append(1))
    # A command that fails at once (no such run directory): the setting came first.
    assert qcalib.cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert calls == [1]
    assert "missing" in capsys.readouterr().err

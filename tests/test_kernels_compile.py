"""Compile lane: every Triton kernel of every family builds for sm_80 and sm_90 without a GPU.

The kernels are compiled in a subprocess with ``TRITON_INTERPRET=0`` (under the interpreter
``@triton.jit`` yields objects that cannot be compiled) by
``python -m lowrank_ops.kernels._compile_check``, which walks ``COMPILE_CASES`` of every module
in ``KERNEL_MODULES`` and prints JSON. Each (case, arch) is then one test here. A second run
compiles every autotune config in fp32 (the largest tiles) and of the quant tile kernel's
large-M rows for sm_80 (the smallest shared memory), so no config a GPU may pick fails to build
or to fit.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from lowrank_ops.kernels._compile_check import ARCHS, all_cases  # noqa: E402

pytestmark = pytest.mark.compile

CASES = [case.name for _, case in all_cases()]


def _compile_check(*args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    # one compiler process per core (this lane is ~220 compiles of 1-5 s: serial, most of CI's time)
    jobs = str(min(4, os.cpu_count() or 1))
    proc = subprocess.run(
        [sys.executable, "-m", "lowrank_ops.kernels._compile_check", "--jobs", jobs, *args],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, f"compile check crashed:\n{proc.stderr[-4000:]}"
    return {(row["variant"], row["arch"]): row for row in json.loads(proc.stdout)}


@pytest.fixture(scope="module")
def first_configs() -> dict:
    return _compile_check()


@pytest.fixture(scope="module")
def all_fp32_configs_sm80() -> dict:
    return _compile_check("--all-configs", "--only", "fp32,large-M", "--arch", "80")


def _check(row: dict) -> None:
    assert row["ok"], f"{row['variant']} for sm_{row['arch']}:\n{row['error']}"
    assert row["cubin_bytes"] > 0


def test_every_module_has_cases():
    assert CASES, "no COMPILE_CASES found"
    assert len(set(CASES)) == len(CASES), "duplicate case names"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", CASES)
def test_compiles(name, arch, first_configs):
    rows = [row for (variant, a), row in first_configs.items() if a == arch and variant.split("#")[0] == name]
    assert rows, f"{name} for sm_{arch}: not compiled"
    for row in rows:
        _check(row)


@pytest.mark.parametrize("name", [n for n in CASES if "fp32" in n or "large-M" in n])
def test_every_autotune_config_fits_sm80(name, all_fp32_configs_sm80):
    rows = [row for (variant, _), row in all_fp32_configs_sm80.items() if variant.split("#")[0] == name]
    assert rows, f"{name}: not compiled"
    for row in rows:
        _check(row)

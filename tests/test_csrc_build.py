"""Compile lane: csrc/ builds with nvcc for sm_80 and sm_90 (no GPU needed), with no warning, no
register spill and no local memory, and the module imports.

The module is imported in a fresh interpreter so this test never loads a second ``_C`` into
the test process. Skipped only when nvcc is absent.
"""
import json
import re
import subprocess
import sys
import textwrap
import time

import pytest

from lowrank_ops.core import cuda_build

pytestmark = pytest.mark.compile

NVCC = cuda_build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="compile lane: nvcc not found")

EXPECTED = ["gear_decode", "lowrank_decode", "lowrank_decode_splits", "quant_decode", "sparse_decode", "DTYPE_FLOAT16", "DTYPE_BFLOAT16"]

PROBE = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("lowrank_ops._C", sys.argv[1])
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    out = {"names": sorted(n for n in dir(m) if not n.startswith("_")),
           "codes": [m.DTYPE_FLOAT16, m.DTYPE_BFLOAT16],
           "splits": [m.lowrank_decode_splits(1, 4096, 64, 132), m.lowrank_decode_splits(16, 4096, 1024, 132),
                      m.lowrank_decode_splits(1, 7, 3, 132)]}
    errors = {}
    def attempt(fn, key, *args):  # bad arguments must come back as exceptions, before any launch
        try:
            getattr(m, fn)(*args)
            errors.setdefault(fn, {})[key] = "no error"
        except Exception as exc:
            errors.setdefault(fn, {})[key] = type(exc).__name__ + ": " + str(exc)
    # (x, v, u, bias, y, ws, M, K, N, R, splits, num_sms, dtype, stream)
    attempt("lowrank_decode", "M=17", 16, 16, 16, 0, 16, 16, 17, 8, 8, 8, 1, 132, 0, 0)
    attempt("lowrank_decode", "R=1025", 16, 16, 16, 0, 16, 16, 1, 8, 8, 1025, 1, 132, 0, 0)
    attempt("lowrank_decode", "dtype=7", 16, 16, 16, 0, 16, 16, 1, 8, 8, 8, 1, 132, 7, 0)
    attempt("lowrank_decode", "null", 0, 16, 16, 0, 16, 16, 1, 8, 8, 8, 1, 132, 0, 0)
    attempt("lowrank_decode", "splits", 16, 16, 16, 0, 16, 16, 1, 8, 8, 8, 9, 132, 0, 0)
    # (x, qweight, qweight_hi, scales, zeros, lut, rowptr, cols, vals, bias, y, M, K, N, bits, g, dtype,
    #  quantized_stats, stream)
    q = lambda key, *args: attempt("quant_decode", key, *args)  # noqa: E731
    q("M=9", 16, 16, 0, 16, 16, 0, 0, 0, 0, 0, 16, 9, 128, 8, 4, 128, 0, 0, 0)
    q("bits=5", 16, 16, 0, 16, 16, 0, 0, 0, 0, 0, 16, 1, 128, 8, 5, 128, 0, 0, 0)
    q("g=16", 16, 16, 0, 16, 16, 0, 0, 0, 0, 0, 16, 1, 128, 8, 4, 16, 0, 0, 0)
    q("null", 0, 16, 0, 16, 16, 0, 0, 0, 0, 0, 16, 1, 128, 8, 4, 128, 0, 0, 0)
    q("hi", 16, 16, 0, 16, 16, 0, 0, 0, 0, 0, 16, 1, 128, 8, 3, 128, 0, 0, 0)
    q("lut+scales", 16, 16, 0, 16, 16, 16, 0, 0, 0, 0, 16, 1, 128, 8, 4, 128, 0, 0, 0)
    q("outliers", 16, 16, 0, 16, 16, 0, 16, 0, 0, 0, 16, 1, 128, 8, 4, 128, 0, 0, 0)
    q("align", 16, 20, 0, 16, 16, 0, 0, 0, 0, 0, 16, 1, 128, 8, 4, 128, 0, 0, 0)
    q("dtype=7", 16, 16, 0, 16, 16, 0, 0, 0, 0, 0, 16, 1, 128, 8, 4, 128, 7, 0, 0)
    q("qstats=2", 16, 16, 0, 16, 16, 0, 0, 0, 0, 0, 16, 1, 128, 8, 4, 128, 0, 2, 0)
    q("qstats+lut", 16, 16, 0, 0, 0, 16, 0, 0, 0, 0, 16, 1, 128, 8, 4, 128, 0, 1, 0)
    # (x, values, indices, bias, y, M, K, N, nm_n, nm_m, dtype, stream[, scales, zeros, group_size])
    sp = lambda key, *args: attempt("sparse_decode", key, *args)  # noqa: E731
    sp("M=9", 16, 16, 16, 0, 16, 9, 64, 8, 2, 4, 0, 0)
    sp("m=6", 16, 16, 16, 0, 16, 1, 60, 8, 2, 6, 0, 0)
    sp("n=4", 16, 16, 16, 0, 16, 1, 64, 8, 4, 4, 0, 0)
    sp("K=66", 16, 16, 16, 0, 16, 1, 66, 8, 2, 4, 0, 0)
    sp("null", 0, 16, 16, 0, 16, 1, 64, 8, 2, 4, 0, 0)
    sp("align", 16, 16, 18, 0, 16, 1, 64, 8, 2, 4, 0, 0)
    sp("dtype=7", 16, 16, 16, 0, 16, 1, 64, 8, 2, 4, 7, 0)
    sp("q4 g=48", 16, 16, 16, 0, 16, 1, 64, 8, 2, 4, 0, 0, 16, 16, 48)
    sp("q4 null", 16, 16, 16, 0, 16, 1, 64, 8, 2, 4, 0, 0, 0, 16, 32)
    sp("dense+scales", 16, 16, 16, 0, 16, 1, 64, 8, 2, 4, 0, 0, 16, 16, 0)
    # (26 pointers, batch_kv_heads, kv_heads, M, nblocks, buffer_tokens, tail_len, prefix_len, bits, group_size,
    #  head_dim, n_out, rank, factor_bits, splits, steps_per_split, qk_scale, dtype, stream, dependent_launch)
    def gear(key, ptrs=None, **sizes):
        args = dict(bh=8, kvh=8, M=4, nblocks=4, B=64, tail=3, prefix=2, bits=2, G=32, D=128, n_out=3, rank=4,
                    factor_bits=16, splits=2, per=9)
        dtype = sizes.pop("dtype", 0)
        args.update(sizes)
        p = [16] * 26 if ptrs is None else ptrs
        attempt("gear_decode", key, *p, *args.values(), 0.1, dtype, 0, False)
    gear("bits=3", bits=3)
    gear("D=96", D=96)
    gear("rank=2", rank=2)
    gear("G>D", D=64, G=128, B=128)
    gear("tail=B", tail=64)
    gear("dtype=7", dtype=7)
    gear("null", ptrs=[16] * 4 + [0] + [16] * 21)
    gear("factor_bits=5", factor_bits=5)
    gear("int8 scale", ptrs=[16] * 8 + [0] + [16] * 17, factor_bits=8)  # key_lr_scale
    gear("prefix=17", prefix=17)
    gear("null prefix", ptrs=[16] * 25 + [0])  # prefix_values
    gear("one split, prefix", ptrs=[16] * 20 + [0] * 3 + [16] * 3, splits=1)  # the combine's partials are needed
    out["errors"] = errors
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("csrc_build")
    start = time.perf_counter()
    # warnings are errors here (not in users' builds, where a newer nvcc may add warnings): a
    # misplaced pragma, an unused variable, a register spill or any local memory (a stack frame: an
    # array indexed at run time) in any kernel fails the compile lane
    path = cuda_build.build(out, archs=["80", "90"], extra_flags=[
        "--Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage,-Werror"])
    print(f"csrc/ built for sm_80 + sm_90 in {time.perf_counter() - start:.1f} s")
    return path


@needs_nvcc
def test_builds_for_sm80_sm90_and_imports(built):
    assert built.name == cuda_build.ext_filename()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(built)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in EXPECTED:
        assert name in info["names"]
    assert info["codes"] == [0, 1]
    s1, s16, s_tiny = info["splits"]
    assert s1 >= 2  # small rank at batch 1 splits K to fill the GPU
    assert s16 == 1 and s_tiny == 1
    expected = {
        "lowrank_decode": [("M=17", "M must be in [1, 16]"), ("R=1025", "R must be in [1, 1024]"), ("dtype=7", "dtype"),
                           ("null", "null pointer"), ("splits", "splits")],
        "quant_decode": [("M=9", "M must be in [1, 8]"), ("bits=5", "bits must be 2, 3 or 4"), ("g=16", "group_size"),
                         ("null", "null pointer"), ("hi", "qweight_hi"), ("lut+scales", "either lut or scales"),
                         ("outliers", "all or none"), ("align", "aligned"), ("dtype=7", "dtype"),
                         ("qstats=2", "quantized_stats must be 0 or 1"), ("qstats+lut", "needs uniform mode")],
        "sparse_decode": [("M=9", "M must be in [1, 8]"), ("m=6", "nm_m must be 4, 8 or 16"), ("n=4", "nm_n must be in"),
                          ("K=66", "K must be a positive multiple"), ("null", "null pointer"), ("align", "4-byte aligned"),
                          ("dtype=7", "dtype"), ("q4 g=48", "group_size must be 0"),
                          ("q4 null", "null pointer for scales or zeros"), ("dense+scales", "4-bit values only")],
        "gear_decode": [("bits=3", "unsupported configuration"), ("D=96", "unsupported configuration"),
                        ("rank=2", "unsupported configuration"), ("G>D", "unsupported configuration"),
                        ("tail=B", "bad sizes"), ("dtype=7", "dtype"), ("null", "null"),
                        ("factor_bits=5", "factor_bits must be 8"), ("int8 scale", "int8 factors need"),
                        ("prefix=17", "bad sizes"), ("null prefix", "null"), ("one split, prefix", "null")],
    }
    for fn, cases in expected.items():
        for key, fragment in cases:
            got = info["errors"][fn][key]
            assert got.startswith("ValueError") and fragment in got, (fn, key, got)


@pytest.fixture(scope="module")
def cuobjdump():
    import glob
    import shutil

    candidates = [str(cuda_build.Path(NVCC).resolve().with_name("cuobjdump")), shutil.which("cuobjdump")]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))
    try:  # Triton ships its own copy of the CUDA binary utilities
        import triton

        candidates.append(str(cuda_build.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    found = next((c for c in candidates if c and cuda_build.Path(c).is_file()), None)
    if found is None:
        pytest.skip("cuobjdump not found")
    return found


@needs_nvcc
def test_embeds_sass_for_both_archs(built, cuobjdump):
    listing = subprocess.run([cuobjdump, "--list-elf", str(built)], capture_output=True, text=True).stdout
    assert "sm_80" in listing and "sm_90" in listing


def sass_functions(built, cuobjdump, arch: str, name_part: str) -> dict[str, str]:
    """{mangled name: cuobjdump -sass text} of the functions of ``arch`` whose name holds ``name_part``."""
    sass = subprocess.run([cuobjdump, "-sass", "-arch", arch, str(built)], capture_output=True, text=True).stdout
    functions = (part.split("\n", 1) for part in re.split(r"\n\s*Function : ", sass)[1:])
    return {head.strip(): body for head, body in functions if name_part in head}


def main_loop(sass: str) -> list[str]:
    """The instructions of a function's main loop: from the target of its longest conditional
    backward branch to that branch (cuobjdump -sass text of one function)."""
    instructions = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    index = {int(address, 16): i for i, (address, _) in enumerate(instructions)}
    best = (0, 0)
    for i, (address, text) in enumerate(instructions):
        branch = re.match(r"@!?P\d+\s+BRA\s+0x([0-9a-f]+)", text.strip())
        if branch and int(branch.group(1), 16) <= int(address, 16):
            start = index[int(branch.group(1), 16)]
            best = max(best, (i - start, start), key=lambda span: span[0])
    return [text.strip() for _, text in instructions[best[1]:best[1] + best[0] + 1]]


# Static size of each GEAR split kernel's compressed-step loop (sm_90 SASS instructions, nvcc 13.0)
# per (bits, head_dim, rank, int8 factors): 3,087-4,294 before the transposed-tile loop (64-bit
# divisions, copy loops, half-empty mma), 799-1,535 with it, 742-1,361 since the block entry forms
# q B_k by one mma chain instead of 32 channels x rank FMAs per lane, the value group and the block
# index came without divisions and the default three key outliers in one pass; 610-1,176 since q is
# kept in fp16 in the key pairs' order (Q' by HMUL2, q B_k as a transposed chain with no operand
# moves), key outliers sum on the row pair by HFMA2, two separate int8 bytes become an fp16 pair in
# three instructions, the value-outlier tile keeps its entries' offsets for the clear, and the mask
# bits are two selects. A loop grown past 110 % of its entry has taken on work that every step may
# pay: find out why, and update the entry only with a reason.
GEAR_LOOP_SIZE = {
    (2, 64, 0, 0): 616, (2, 64, 4, 0): 795, (2, 64, 4, 1): 873, (2, 64, 8, 0): 834, (2, 64, 8, 1): 909,
    (2, 128, 0, 0): 778, (2, 128, 4, 0): 1038, (2, 128, 4, 1): 1144, (2, 128, 8, 0): 1057, (2, 128, 8, 1): 1157,
    (4, 64, 0, 0): 610, (4, 64, 4, 0): 793, (4, 64, 4, 1): 865, (4, 64, 8, 0): 826, (4, 64, 8, 1): 902,
    (4, 128, 0, 0): 787, (4, 128, 4, 0): 1046, (4, 128, 4, 1): 1162, (4, 128, 8, 0): 1073, (4, 128, 8, 1): 1176,
}


@needs_nvcc
def test_gear_split_loop_makes_no_calls_and_keeps_its_size(built, cuobjdump):
    # The loop once divided 64-bit token positions by the group and block sizes: each division a
    # subroutine CALL plus ~25 instructions on its fast path, every 16-token step. It now shifts
    # and counts; a CALL there again would be such a division (or another slow path).
    sizes = {}
    for name, kernel in sass_functions(built, cuobjdump, "sm_90", "gear_split_kernel").items():
        key = tuple(int(x) for x in re.search(r"ILi(\d)ELi(\d+)ELi(\d)ELb(\d)E", name).groups())
        loop = main_loop(kernel)
        assert any(op.startswith("HMMA") for op in loop), name
        calls = [op for op in loop if re.search(r"\bCALL\b", op)]
        assert not calls, (key, calls)
        sizes[key] = len(loop)
    assert set(sizes) == set(GEAR_LOOP_SIZE), "one split kernel per (bits, head_dim, rank, factor storage)"
    grown = {key: (size, GEAR_LOOP_SIZE[key]) for key, size in sizes.items() if size > 1.1 * GEAR_LOOP_SIZE[key]}
    assert not grown, grown


# sm_90 SASS of griddepcontrol.wait / .launch_dependents (ptx::wait_for_prior_grids / allow_dependent_grids)
GRID_WAIT, GRID_RELEASE = "ACQBULK", "PREEXIT"
GLOBAL_MEMORY_OP = re.compile(r"^(@!?P\d+\s+)?(LDG|STG|LDGSTS|LD|ST|RED|ATOM|CCTL)\b")


@needs_nvcc
def test_gear_kernels_wait_for_the_grid_before_them_on_sm90_only(built, cuobjdump):
    # Launched with programmatic stream serialization on sm_90, a GEAR kernel's CTAs may start while
    # the kernel before it still writes q (or reads what becomes the output): no global load, store or
    # copy may come before the wait. The split kernel also lets the combine kernel's CTAs be placed early.
    kernels = sass_functions(built, cuobjdump, "sm_90", "gear_")
    assert sum("gear_split_kernel" in name for name in kernels) == len(GEAR_LOOP_SIZE)
    assert sum("gear_combine_kernel" in name for name in kernels) == 2  # head_dim 64 and 128
    for name, sass in kernels.items():
        ops = [op.strip() for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass)]
        first_memory = next(i for i, op in enumerate(ops) if GLOBAL_MEMORY_OP.match(op))
        assert GRID_WAIT in ops[:first_memory], f"{name}: a global memory access before {GRID_WAIT}"
        assert ("gear_split_kernel" not in name) or GRID_RELEASE in ops, name
    for name, sass in sass_functions(built, cuobjdump, "sm_80", "gear_").items():
        assert GRID_WAIT not in sass and GRID_RELEASE not in sass, f"{name}: sm_80 has no griddepcontrol"


def test_arch_parsing():
    assert cuda_build.parse_archs("80;90") == ["80", "90"]
    assert cuda_build.parse_archs(["sm_90", "8.0"]) == ["90", "80"]
    assert cuda_build.parse_archs("90a") == ["90a"]
    with pytest.raises(ValueError):
        cuda_build.parse_archs("hopper")
    flags = cuda_build.gencode_flags(["80", "90"])
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=compute_90" in flags


def test_sources_include_every_cu_and_the_bindings():
    names = [p.name for p in cuda_build.sources()]
    assert {"lowrank_decode.cu", "quant_decode.cu", "sparse_decode.cu"} <= set(names) and names[-1] == "module.cpp"

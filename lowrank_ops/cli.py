"""``lowrank-ops``: demo, compress, bench."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _compress(args: argparse.Namespace) -> int:
    import torch

    from lowrank_ops import compress
    from lowrank_ops.hf import load_hf_model, save_compressed_dir
    from lowrank_ops.textdata import calibration_sentences

    options = _family_options(args)  # bad combinations fail before the model is loaded
    model, tokenizer = load_hf_model(args.src)
    calib_data = None
    if not args.no_calib:
        texts = Path(args.calib_text).read_text().splitlines() if args.calib_text else calibration_sentences(args.calib_sentences)
        texts = [t for t in texts if t.strip()]
        calib_data = [
            dict(tokenizer(texts[i : i + args.batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(texts), args.batch_size)
        ]
    with torch.no_grad():
        report = compress(
            model, args.kind, calib_data=calib_data, include=args.include, exclude=args.exclude,
            progress=True, **options,
        )
    out = save_compressed_dir(model, args.src, args.out, report)
    print(report)
    print(f"wrote {out}")
    return 0


def _family_options(args: argparse.Namespace) -> dict:
    """The options of ``compress()`` for the chosen family, from the command line."""
    if args.kind == "nm":
        if args.rank is not None or args.ratio is not None or args.energy is not None:
            raise ValueError("--rank/--ratio/--energy: low-rank options, not for --kind nm")
        return {"n": args.n, "m": args.m, "method": args.pruner, "quantize_values": args.quantize_values,
                "group_size": args.group_size, "lowrank_rank": args.lowrank_rank}
    if args.kind == "quant":
        options = {"bits": args.bits, "group_size": args.group_size, "outliers": args.outliers,
                   "method": args.quantizer, "lut": args.lut, "quantize_stats": args.quantize_stats,
                   "lowrank_rank": args.lowrank_rank}
        if args.rank is not None or args.ratio is not None or args.energy is not None:
            raise ValueError("--rank/--ratio/--energy: low-rank options, not for --kind quant")
        return options
    chosen = {k: getattr(args, k) for k in ("rank", "ratio", "energy") if getattr(args, k) is not None}
    if len(chosen) != 1:
        raise ValueError(f"--ratio/--rank/--energy: --kind lowrank needs exactly one, got {sorted(chosen) or 'none'}")
    return {**chosen, "allocation": args.allocation}


def _demo(rest: list[str]) -> int:
    from lowrank_ops import demo

    return demo.main(rest)


def _bench(rest: list[str]) -> int:
    """``lowrank-ops bench [--suite lowrank|quant|sparse|kvcache] ARGS``: the low-rank suite unless told otherwise."""
    suites = ("lowrank", "quant", "sparse", "kvcache")
    rest = list(rest)
    suite = "lowrank"
    for i, arg in enumerate(rest):
        if arg == "--suite" or arg.startswith("--suite="):
            value = arg.split("=", 1)[1] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else "")
            del rest[i : i + (1 if "=" in arg else 2)]
            suite = value
            break
    if suite not in suites:
        print(f"error: --suite: expected one of {list(suites)}, got {suite!r}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(f"lowrank_ops.benchmarks.{suite}").main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="compress all-MiniLM-L6-v2 with every weight family (low-rank, quant, N:M) and compare (extra args go to the demo; try 'demo --help')", add_help=False)
    sub.add_parser("bench", help="microbenchmarks of the kernels (extra args go to the benchmark; try 'bench --help')", add_help=False)
    c = sub.add_parser("compress", help="compress a saved transformers model directory")
    c.add_argument("src", help="model directory with config.json, or 'minilm' for the bundled all-MiniLM-L6-v2")
    c.add_argument("out", help="output directory (config, tokenizer, compressed.safetensors, report.json)")
    c.add_argument("--kind", choices=("lowrank", "quant", "nm"), default="lowrank", help="the compression family")
    low = c.add_argument_group("--kind lowrank (exactly one of --ratio, --rank, --energy)")
    low.add_argument("--ratio", type=float, help="fraction of each layer's parameters kept (0.5 = half)")
    low.add_argument("--rank", type=int, help="the same rank for every layer")
    low.add_argument("--energy", type=float, help="keep this fraction of each spectrum's energy")
    low.add_argument("--allocation", choices=("uniform", "global"), default="uniform", help="'global' spends a ratio budget non-uniformly across layers")
    quant = c.add_argument_group("--kind quant")
    quant.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    quant.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    quant.add_argument("--outliers", type=float, default=0.0, help="fraction of weights kept exactly (0 to 0.05)")
    quant.add_argument("--quantizer", default="auto", choices=("auto", "gptq", "rtn", "hqq", "lut"), help="auto: GPTQ with calibration, HQQ without")
    quant.add_argument("--lut", action="store_true", help="per-channel k-means lookup tables instead of a uniform grid")
    quant.add_argument("--quantize-stats", action="store_true",
                       help="SpQR-style 4-bit second-level scales/zeros (pairs with --group-size 32: 3-bit costs 3.31 bits)")
    quant.add_argument("--lowrank-rank", type=int, default=0, help="rank of the EoRA compensation path (0 = none; also --kind nm)")
    nm = c.add_argument_group("--kind nm (N:M sparsity along the input dimension; --group-size, --lowrank-rank apply too)")
    nm.add_argument("--n", type=int, default=2, help="weights kept per group")
    nm.add_argument("--m", type=int, default=4, choices=(4, 8, 16), help="group length")
    nm.add_argument("--pruner", default="auto", choices=("auto", "magnitude", "wanda", "sparsegpt"), help="auto: SparseGPT with calibration, magnitude without")
    nm.add_argument("--quantize-values", action="store_true", help="store the kept values in 4 bits (quant family format)")
    c.add_argument("--calib-text", help="text file, one calibration sentence per line (default: built-in real text)")
    c.add_argument("--calib-sentences", type=int, default=256, help="built-in calibration sentences to use")
    c.add_argument("--no-calib", action="store_true", help="no calibration data (plain SVD; data-free quantizers)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--include", nargs="*", help="glob patterns of layer names to compress")
    c.add_argument("--exclude", nargs="*", help="glob patterns of layer names to keep dense")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("demo", "bench"):
        return (_demo if argv[0] == "demo" else _bench)(argv[1:])
    args = build_parser().parse_args(argv)
    return _compress(args)


if __name__ == "__main__":
    sys.exit(main())

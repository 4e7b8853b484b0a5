"""``python -m hybridgen <command>``: the project's command-line entry points."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from ..guard import HybridPathError

#: Subcommand modules and the commands each registers. Those that need an optional extra
#: (transformers and friends) are imported here, not above, so that a plain ``pip install``
#: still runs ``demo`` and ``--version``, and the others say what to install.
COMMANDS = [
    (".generate", ["generate"]),
    ("..eval.cli", ["eval", "profile-kmin"]),
    (".demo", ["demo"]),
    (".bench", ["bench"]),
    ("..vllm.serve", ["serve"]),
    (".warmup", ["warmup"]),
]
#: Packages that only an extra brings, and the extra that does.
OPTIONAL = {
    "transformers": "hf",
    "gguf": "hf",
    "accelerate": "hf",
    "lm_eval": "eval",
    "flexgen": "flexgen",
    "vllm": "vllm",
}


def provenance() -> str:
    """What ``--version`` prints: the version and where it is installed, the instruction set the
    kernels chose on this CPU, and whether the CUDA path can run here (and if not, why)."""
    import platform

    import torch

    import hybridgen

    from .. import _native, cuda

    p = cuda.probe()
    lines = [
        f"hybridgen {hybridgen.__version__} ({hybridgen.__path__[0]})",
        f"python {platform.python_version()} ({platform.python_implementation()}, {platform.system()} {platform.machine()}), "
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"cpu: {_native.isa()} kernels chosen at run time (this CPU runs: {', '.join(_native.available_isas())}), "
        f"{_native.num_threads()} threads",
    ]
    if p["available"]:
        lines.append(f"cuda: available, {p['devices']} device(s)")
    else:
        lines.append(
            f"cuda: unavailable (driver {'found' if p['driver'] else 'not found'}, {p['devices']} device(s)): {p['reason']}"
        )
    try:
        n = _native.nvrtc_info()
        lines.append(f"nvrtc: {n['version']} at {n['path']}")
    except cuda.CudaUnavailableError as e:
        lines.append(f"nvrtc: not found: {e}")
    return "\n".join(lines)


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(
            option_strings, dest, nargs=0, help="print the version, the CPU kernels chosen and the CUDA status"
        )

    def __call__(self, parser, namespace, values, option_string=None):
        print(provenance())
        parser.exit()


def _missing_extra(sub, commands, error: ModuleNotFoundError, extra: str) -> None:
    def fail(args):
        raise SystemExit(f"python -m hybridgen {args.command}: needs {error.name}: pip install 'hybridgen[{extra}]'")

    for name in commands:
        # Takes any arguments (--help included: no prefix character is one) and answers with what to install.
        p = sub.add_parser(name, help=f"(needs pip install 'hybridgen[{extra}]')", add_help=False, prefix_chars="\0")
        p.add_argument("args", nargs="*")
        p.set_defaults(func=fail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridgen", description="CPU-GPU hybrid attention")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)
    for module, commands in COMMANDS:
        try:
            importlib.import_module(module, __package__).build_parser(sub)
        except ModuleNotFoundError as e:
            if e.name not in OPTIONAL:
                raise
            _missing_extra(sub, commands, e, OPTIONAL[e.name])
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = "python -m hybridgen " + shlex.join(argv)  # what a record says produced it
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad arguments or data: a message, not a traceback
        parser.exit(2, f"python -m hybridgen {args.command}: error: {e}\n")
    except HybridPathError as e:  # the run did not measure what it would report
        parser.exit(3, f"python -m hybridgen {args.command}: FAILED, hybrid attention did not run: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

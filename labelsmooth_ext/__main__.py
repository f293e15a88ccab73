"""Command line: `python -m labelsmooth_ext {info,check,demo}` (also installed as `labelsmooth-ext`)."""

import argparse
import json
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="labelsmooth-ext", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print the backend in use and how the extension was built (JSON)")
    check = commands.add_parser("check", help="compare loss and gradient with PyTorch on random inputs")
    check.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    commands.add_parser("demo", help="label smoothing's calibration effect and the kernels' speed (see `demo --help`)",
                        add_help=False)
    # The demo parses its own options.
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    import labelsmooth_ext

    if args.command == "info":
        print(json.dumps(labelsmooth_ext.backend_info(), indent=2))
        return 0
    from .selfcheck import main as check_main

    return check_main(args.seed)


if __name__ == "__main__":
    sys.exit(main())

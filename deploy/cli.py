"""The ``streamrec`` console command. Each subcommand lives beside the code it drives and registers
itself through an ``add_cli(subparsers)`` function; this module only assembles them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from streams.config import ConfigError, load_config

# module that defines add_cli(subparsers); order = order in --help
_COMMANDS = [
    "deploy.stack",          # up
    "streams.sources.generate",      # generate
    "streams.sources.replay",        # replay
    "streams.flows.labels",        # labels
    "streams.flows.stats",    # stats
    "trainer.service",       # train
    "trainer.score",         # score
    "dashboards.server",     # dashboard
    "dashboards.grafana",    # dashboards push / export
    "embedding_store.users", # users
    "deploy.bench",          # bench NAME
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Streaming online learning for ads ranking: replay or generate events into Kafka, label them "
                    "with Bytewax, train continuously, and watch metrics live.",
        epilog="Configuration: --config FILE (YAML) and STREAMREC_<SECTION>__<FIELD> environment variables; "
               "see README.md. Every subcommand has its own --help.")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (default: $STREAMREC_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # subcommand not built yet
                continue
            raise
        mod.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"streamrec: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, cfg) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

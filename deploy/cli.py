"""The ``streamrec`` console command. Each subcommand lives beside the code it drives and registers
itself through an ``add_cli(subparsers)`` function; this module only assembles them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from config import ConfigError, load_config

# command -> module whose add_cli(subparsers) registers it; order = order in --help. Only the module of the
# command being run is imported (a labels cluster process starts without torch), all of them for --help.
_COMMANDS = {
    "up": "deploy.up",
    "audience": "deploy.audience",
    "generate": "streams.sources.generate",
    "replay": "streams.sources.replay",
    "labels": "deploy.flows",
    "stats": "deploy.flows",
    "distill": "deploy.flows",
    "precompute": "trainer.solaris",
    "train": "trainer.service",
    "score": "trainer.score",
    "export": "trainer.score",
    "serve": "serving.service",
    "models": "trainer.models_cli",
    "dashboard": "dashboards.server",
    "dashboards": "dashboards.grafana",
    "users": "embedding_store.users",
    "chaos": "deploy.chaos",
    "bench": "deploy.bench",
    "build-kernels": "embedding_store.kernels",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of ``command`` when it is a known one."""
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Streaming online learning for ads ranking: replay or generate events into Kafka, label them "
                    "with Bytewax, train continuously, and watch metrics live.",
        epilog="Configuration: --config FILE (YAML) and STREAMREC_<SECTION>__<FIELD> environment variables; "
               "see README.md. Every subcommand has its own --help.")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (default: $STREAMREC_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [_COMMANDS[command]] if command in _COMMANDS else _COMMANDS.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(name).add_cli(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (skipping the global options), without parsing the rest."""
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return argv[i]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command(argv))
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

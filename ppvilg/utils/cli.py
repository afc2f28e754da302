"""The one command-line convention of every tool: -c CONFIG, repeatable -o KEY=VALUE."""
import argparse
import sys

import ppvilg.engine.tasks  # noqa: F401  (registers every task and model config that a -c file may name)
from ppvilg.config import ConfigError, load_config


def config_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("-c", "--config", required=True, help="YAML config file (may use _base_)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -o Train.max_steps=100 (repeatable)")
    return p


def load_or_exit(args):
    try:
        return load_config(args.config, args.override)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)

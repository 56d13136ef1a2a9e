"""`python -m prefixroute.devtools.bench`: the same as `prefixroute bench`."""

from __future__ import annotations

import argparse
import sys

from prefixroute.devtools.bench.cli import cli_arguments, cli_main

if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m prefixroute.devtools.bench")
    cli_arguments(_parser)
    sys.exit(cli_main(_parser.parse_args()))

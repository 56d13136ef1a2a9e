"""`python -m prefixroute.devtools.fake_engine`: the `prefixroute fake-engine` command."""

from __future__ import annotations

import argparse
import sys

from prefixroute.devtools import fake_engine
from prefixroute.devtools.fake_engine.cli import cli_arguments, cli_main

_parser = argparse.ArgumentParser(
    prog="prefixroute fake-engine", description=(fake_engine.__doc__ or "").split("\n", 1)[0]
)
cli_arguments(_parser)
sys.exit(cli_main(_parser.parse_args()))

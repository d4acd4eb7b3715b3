"""``python -m comm_fast.info``: print which backend each op uses here, and why.

Only an entry point: ``comm_fast.info`` is the function (implemented in comm_fast._info).
"""
import argparse

from comm_fast._info import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m comm_fast.info", description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))

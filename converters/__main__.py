"""``python -m converters {list,convert,verify,manifest,evaluate}``.

The command line looks models up in the zoo, so it lives with the zoo (``lightning_app.zoo.cli``);
this entry point only forwards there. The ``converters`` library modules never import ``lightning_app``.
"""
import sys

from lightning_app.entry import run
from lightning_app.zoo.cli import main

if __name__ == "__main__":
    sys.exit(run(main))

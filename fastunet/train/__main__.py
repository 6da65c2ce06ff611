"""``python -m fastunet.train`` (and ``torchrun -m fastunet.train``): the command line of fastunet.train.cli."""

from .cli import main

main()

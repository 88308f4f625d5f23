import sys

from .signals import install_if_training

install_if_training(sys.argv[1:])  # first: a signal during start-up asks for a checkpoint, it does not kill

from .cli import main  # noqa: E402

sys.exit(main())

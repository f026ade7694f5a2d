"""wan_cli: the ``wan`` command line (installed from the ``cli/`` folder as ``wan_cli``).

Importing it is cheap and never imports torch; ``wan_cli.main:main`` is the console script.
"""

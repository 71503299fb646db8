"""The ``lla-verify`` subcommands, one module each; lla_verify/cli.py's table lists them."""

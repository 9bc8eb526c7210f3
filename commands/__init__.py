"""The command-line handlers behind `cli.py`: each module adds its subcommands' parsers and runs them."""

"""Command-line interface: parses arguments and calls the library, nothing more.

Each subcommand lives in its own module here and imports its heavy dependencies inside the function, so that
``covidseg --help`` is instant.
"""

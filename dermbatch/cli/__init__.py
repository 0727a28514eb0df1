"""The ``dermbatch`` command line: thin Typer commands over the library."""

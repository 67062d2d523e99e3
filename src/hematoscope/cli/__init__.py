"""The ``hematoscope`` command line: a thin Typer layer over the library (see ``main.py``)."""

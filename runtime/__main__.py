"""`python -m sdonnx`: the command line run by a given interpreter, e.g. a venv's that is not activated."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="sdonnx")

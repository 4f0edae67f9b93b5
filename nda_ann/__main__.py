"""``python -m nda_ann ...`` runs the ``nda-ann`` command line."""
from .cli import main

if __name__ == "__main__":
    main()

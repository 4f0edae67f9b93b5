"""How every command reports a failure: one line, the file and the problem, exit status 1."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from ..errors import NdaError, os_error_message


@contextmanager
def reported(target: str | Path | None = None) -> Iterator[None]:
    """Turn nda-ann's errors, bad values, failed reads and writes (disk full, no permission) and
    an exhausted memory into a ``click.ClickException`` of one line (no traceback).

    ``target``: what the command makes (store, index or results folder), named when an OSError
    does not say which file failed.
    """
    try:
        yield
    except click.ClickException:
        raise
    except (NdaError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    except FileExistsError as err:
        raise click.ClickException(str(err) if err.errno is None else os_error_message(err, target)) from err
    except OSError as err:
        raise click.ClickException(os_error_message(err, target)) from err
    except MemoryError as err:
        raise click.ClickException(f"not enough memory ({str(err) or 'MemoryError'}); lower the option that sizes it "
                                   "(such as --k, --candidates, --n-train, --batch-size) or use a machine with more memory") from err


def echo_device(line: str) -> None:
    """The one device line of a command, on stderr so that stdout stays the command's result."""
    click.echo(line, err=True)

"""Flag value types with clear argparse errors, and the flags every bench command shares
(`--output-json`, `--disable-tqdm`)."""

from __future__ import annotations

import argparse
import json
import math


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (no server at the address, a model it does not
    serve); the command prints it in one line and exits 1."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it, or it is None (no value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _parse(float, text, "a number")
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def request_rate(text: str) -> float:
    """Requests per second above 0; `inf` sends every request at once."""
    value = _parse(float, text, "a number or inf")
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be above 0 (requests/s), or inf to send all at once; got {text}")
    return value


def range_ratio(text: str) -> float:
    value = _parse(float, text, "a number")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _parse(kind: type, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-json", default=None, metavar="PATH",
                        help="also write the results, as JSON, to this file")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def write_json(path: str, record: dict) -> None:
    """--output-json: the results record, indented."""
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")

"""vLLM's spellings of Strata's flags and keywords, and vLLM's options Strata takes only at its own value.

As vLLM's FlexibleArgumentParser: `--max_model_len` is `--max-model-len`, `--config FILE` is a YAML
of flags (the command line wins), `--max-model-len 4k` is 4000 (4K: 4096), `--dtype half` is
float16. `check_vllm_options` accepts vLLM options whose value is what Strata does anyway
(`--no-enable-prefix-caching`, `--enable-chunked-prefill`, `--kv-cache-dtype auto`, `-dp 1`,
`--trust-remote-code`) and refuses any other value, saying what Strata does instead. Shared by
`strata serve`, `strata bench` and the offline `LLM(...)` keywords.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("strata")

DTYPE_ALIASES = {"half": "float16", "float": "float32"}
"""vLLM's other --dtype spellings."""


class FlagError(ValueError):
    """A flag this build cannot honour, or a combination that makes no sense."""


def human_readable_int(text: str) -> int:
    """vLLM's integers with a size suffix: k, m, g are powers of 1000 (decimals allowed: 25.6k is
    25600); K, M, G are powers of 1024 (whole numbers only)."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG])", value)
    if match:
        number, suffix = match.groups()
        if suffix in "kmg":
            return int(float(number) * 1000 ** ("kmg".index(suffix) + 1))
        if "." in number:
            raise argparse.ArgumentTypeError(f"decimals are not allowed with the binary suffix {suffix} in {text!r}; "
                                             f"did you mean {number}{suffix.lower()}?")
        return int(number) * 1024 ** ("KMG".index(suffix) + 1)
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, optionally with a suffix k/m/g (x1000) or K/M/G "
                                         f"(x1024), got {text!r}") from None


def spell_flag(key: str, value: Any) -> str:
    """How the command line says option `key` = `value`."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def spell_keyword(key: str, value: Any) -> str:
    return f"{key}={value!r}"


def check_vllm_options(options: dict[str, Any], spell: Callable[[str, Any], str] = spell_flag) -> None:
    """vLLM's options that Strata accepts only with the value it runs with anyway; any other value
    raises FlagError naming the option (as `spell` writes it) and what Strata does instead. Keys
    missing from `options` (or None) are vLLM's defaults that are also Strata's.

    trust_remote_code is accepted either way: Strata never runs code from a checkpoint, and every
    architecture it supports loads the same without it (transformers' own config and tokenizer
    classes); one that needs its own code fails in preflight, saying so."""
    problems = []

    def refuse(key: str, why: str) -> None:
        problems.append(f"{spell(key, options[key])}: {why}")

    if options.get("enable_prefix_caching"):
        refuse("enable_prefix_caching", "Strata has no prefix caching (every request prefills its whole prompt); "
                                        "leave it out, or say " + spell("enable_prefix_caching", False))
    if options.get("enable_chunked_prefill") is False:
        refuse("enable_chunked_prefill", "Strata always prefills long prompts in chunks of max_num_batched_tokens; "
                                         "to prefill each prompt in one step, make max_num_batched_tokens at "
                                         "least max_model_len")
    if options.get("quantization") is not None:
        refuse("quantization", "Strata runs unquantised weights only: use an unquantised checkpoint, with dtype "
                               "auto, float16, bfloat16 or float32")
    if options.get("kv_cache_dtype", "auto") not in (None, "auto"):
        refuse("kv_cache_dtype", "Strata keeps the KV cache in the model's dtype; only auto is supported")
    if options.get("data_parallel_size", 1) not in (None, 1):
        refuse("data_parallel_size", "Strata runs one engine (data parallel size 1); for more throughput run "
                                     "several servers behind a load balancer, or one larger engine with "
                                     "tensor/pipeline parallelism")
    if problems:
        raise FlagError("; ".join(problems))
    if options.get("trust_remote_code"):
        logger.info("%s: accepted; it changes nothing, as Strata runs no code from checkpoints (every architecture "
                    "it supports is its own, loaded through transformers' built-in config and tokenizer)",
                    spell("trust_remote_code", True))


def accept_vllm_spellings(parser: argparse.ArgumentParser) -> None:
    """Makes `parser` read its arguments as vLLM's FlexibleArgumentParser does (see
    `vllm_argv`). Wraps the parser's own parse_known_args, which is what argparse calls for a
    subcommand too, so `strata serve`, `python -m strata.app.job` and tests all get it."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        return parse(vllm_argv(parser, list(sys.argv[1:] if args is None else args)), namespace)

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def vllm_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` in the spelling `parser` knows: underscores in long flags become dashes
    (`--max_model_len=4k` -> `--max-model-len=4k`), and `--config FILE` adds the file's flags ahead
    of the others (after MODEL), so any flag on the command line wins, as in vLLM."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            out += argv[i:]
            break
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = name.replace("_", "-") + eq + value
        out.append(token)
    path = None
    for i, token in enumerate(out):
        if token == "--config" and i + 1 < len(out):
            path = out[i + 1]
        elif token.startswith("--config="):
            path = token.partition("=")[2]
    if path is None:
        return out
    has_model = bool(out) and not out[0].startswith("-")
    at = 1 if has_model else 0
    return out[:at] + _config_file_args(parser, path, drop_model=has_model) + out[at:]


def _config_file_args(parser: argparse.ArgumentParser, path: str, drop_model: bool) -> list[str]:
    """The flags a vLLM config YAML stands for: `key: value` -> --key value, `key: true` -> --key,
    `key: false` -> --no-key (or nothing, for a flag that is off by default), a list -> --key a b.
    `model:` is --model unless MODEL was given. Unknown keys are argparse errors naming the file."""
    import yaml

    if not path.endswith((".yaml", ".yml")):
        parser.error(f"--config {path}: expected a YAML file (.yaml or .yml)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: {err}")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    known = parser._option_string_actions  # argparse has no public index of its flags
    args: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--config" or flag not in known:
            parser.error(f"--config {path}: {key!r} is not a flag of this command")
        if value is None or (flag == "--model" and drop_model):
            continue
        if isinstance(value, bool):
            negative = "--no-" + flag[2:]
            if value or negative in known:
                args.append(flag if value else negative)
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args

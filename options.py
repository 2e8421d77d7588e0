"""
Stage options: one dataclass per stage (sft.SFTConfig, rl.RLConfig, distill.MOPDConfig), read from --config
FILE.json and then --field=value, and checked before any work: every problem is reported at once, one line each,
naming the option or the JSON key at fault (ConfigError). Defaults are the tiny CPU run; a field's help text is
the comment after it in the dataclass.
"""
import argparse
import inspect
import json
import os
import re
import typing
from dataclasses import fields

import torch


# Config: one dataclass per stage, defaults for the tiny CPU run; --config FILE.json, then --field=value override.


def _field_comments(cls):
    """Help text for each field: the comment after it in the dataclass source (`lr: float = 3e-6  # peak lr`)."""
    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _convert(value, typ, key):
    """Parse a command-line string (or check a JSON value) as `typ`; errors name the key."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":      # Optional[X] / X | None
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, args[0], key)
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else value
        item_types = [t for t in typing.get_args(typ) if t is not Ellipsis] or [str]
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"--{key}: expected a comma-separated list, got {value!r}")
        if origin is tuple and Ellipsis not in typing.get_args(typ) and len(items) != len(item_types):
            raise ValueError(f"--{key}: expected {len(item_types)} comma-separated values, got {value!r}")
        return origin(_convert(v, item_types[0], key) for v in items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"--{key}: expected {typ.__name__}, got {value!r}")
        try:
            out = typ(value) if typ is float or not isinstance(value, str) else int(value)
        except ValueError:
            raise ValueError(f"--{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"--{key}: expected int, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"--{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key}: unsupported type {typ}")


def config_from_dict(cls, values: dict, source="config", check=True):
    """Apply a dict of overrides to cls's defaults; unknown keys and wrong types raise ValueError naming them,
    then check_config checks the whole config (check=False: names and types only, for a partial preset whose
    merge with the command line is checked later)."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; valid options are: {', '.join(valid)}")
    cfg = cls(**{k: _convert(v, hints[k], k) for k, v in values.items()})
    return check_config(cfg) if check else cfg


def parse_config(cls, argv=None, description=None):
    """
    Build the stage's config from its dataclass defaults, an optional `--config FILE.json` preset, then
    `--field=value` flags (in that order of precedence). `--help` lists every field with type, default and the
    comment beside it in the source.
    """
    defaults, comments, hints = cls(), _field_comments(cls), typing.get_type_hints(cls)
    ap = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", metavar="FILE.json", help="preset of option values; flags given here override it")
    for f in fields(cls):
        typ = hints[f.name]
        tname = getattr(typ, "__name__", str(typ)).replace("typing.", "")
        flag = dict(nargs="?", const="true") if typ is bool else {}     # a bare `--bf16` means true
        ap.add_argument(f"--{f.name}", metavar=tname.upper(), default=None, **flag,
                        help=f"{comments.get(f.name, '')} (default: {getattr(defaults, f.name)!r})")
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        ap.error(f"unknown option(s) {unknown}; valid options are: "
                 f"{', '.join('--' + f.name for f in fields(cls))}, --config")
    values = {}
    try:
        if args.config:
            try:
                with open(args.config) as fh:
                    preset = json.load(fh)
            except FileNotFoundError:
                raise ValueError(f"--config {args.config}: no such file") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"--config {args.config}: not valid JSON ({e})") from None
            if not isinstance(preset, dict):
                raise ValueError(f"--config {args.config}: expected a JSON object of option values")
            hints_ = typing.get_type_hints(cls)
            unknown = [k for k in preset if k not in hints_]
            if unknown:
                raise ValueError(f"--config {args.config}: unknown option(s) {unknown}; valid options are: "
                                 f"{', '.join(f.name for f in fields(cls))}")
            try:
                values = {k: _convert(v, hints_[k], k) for k, v in preset.items()}
            except ValueError as e:
                raise ValueError(f"--config {args.config}: {e}") from None
        values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
        return config_from_dict(cls, values, source="command line")
    except ValueError as e:
        ap.error(str(e))


# ----------------------------------------------------------------------------------------------------------------
# Config checks, before any work. check_config runs on every stage's config (config_from_dict and parse_config
# call it; each stage's main calls it again for configs built in code): the SHARED_RULES below apply to any field
# of that name, the shared cross-field checks to the fields a stage has, then the stage's own `validate(self)`
# adds its problems, e.g.
#     def validate(self):
#         return common.check_fields(self, group_size=common.at_least(1), prompt_data=common.data_source)
# A rule takes the value and returns None (fine) or why it is wrong. Every problem is reported at once, one line
# each, naming the option; no model is loaded and nothing is read beyond config.json files and safetensors
# headers.


class ConfigError(ValueError):
    pass


def at_least(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def above(lo):
    return lambda v: None if v > lo else f"must be > {lo}"


def in_range(lo, hi):
    """lo <= v < hi"""
    return lambda v: None if lo <= v < hi else f"must be in [{lo}, {hi})"


def one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(repr(c) for c in choices)}"


def each(rule):
    return lambda vs: next((f"item {v!r} {why}" for v in vs if (why := rule(v))), None)


def optional(rule):
    """The empty string turns the option off; anything else must pass `rule`."""
    return lambda v: None if v == "" else rule(v)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def looks_local(name: str) -> bool:
    """A path, not an HF hub name (`owner/name`): it is never sent to the Hub, so a typo fails at once."""
    return (name.startswith((".", "/", "~")) or name.endswith(DATA_SUFFIXES) or name.count("/") != 1
            or os.sep != "/" and os.sep in name)


def data_source(name):
    """A local file or dataset directory that exists, an HF hub name, or "tiny" (see tasks.load_examples)."""
    if not name:
        return "must name a JSONL/parquet file, a dataset directory or an HF hub name (owner/name)"
    if name == "tiny" or os.path.exists(name) or not looks_local(name):     # "tiny": the shipped data
        return None
    return "no such file or directory (a local path, so it is not looked up on the HF hub)"


def model_source(path):
    """An HF checkpoint directory (config.json + safetensors) or a model config.json, read and checked."""
    from model import ModelConfig, safetensors_shards
    if not os.path.exists(path):
        return "no such checkpoint directory or model config file"
    try:
        ModelConfig.from_path(path)
        if os.path.isdir(path):
            safetensors_shards(path, check=True)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def tokenizer_source(path):
    if not os.path.exists(path):
        return "no such tokenizer.json or tokenizer directory"
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "tokenizer.json")):
        return f"no tokenizer.json in directory {path}"
    return None


def writable_dir(path):
    """A directory that exists and is writable, or one that can be created."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a directory"
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, so the directory cannot be created"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def writable_file(path):
    """A file that can be (over)written: checked before the work whose result goes there."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "is not writable"
    return writable_dir(os.path.dirname(path))


SHARED_RULES = dict(
    model=model_source, tokenizer=optional(tokenizer_source), train_data=data_source,
    eval_data=optional(data_source), out_dir=writable_dir,
    lr=above(0), min_lr=at_least(0), warmup_steps=at_least(0), schedule=one_of("cosine", "constant"),
    betas=each(in_range(0, 1)), weight_decay=at_least(0), grad_clip=at_least(0), moe_bias_update_rate=at_least(0),
    seq_len=at_least(2), micro_batch=at_least(1), global_batch=at_least(1), epochs=above(0), max_steps=at_least(0),
    val_fraction=in_range(0, 1), eval_per_domain=at_least(0), eval_max_new_tokens=at_least(1),
    eval_every=at_least(0), save_every=at_least(0), keep_last=at_least(1), dist_timeout_s=above(0),
    device=one_of("auto", "cpu", "cuda"), export_dtype=one_of("", "bfloat16", "float32"),
)


def check_fields(cfg, **rules):
    """Problems ('--field=value: why') of the fields of cfg that `rules` names (field=rule)."""
    problems = []
    for name, rule in rules.items():
        value = getattr(cfg, name)
        why = rule(value)
        if why:
            problems.append(f"--{name}={value}: {why}")
    return problems


def _shared_cross_checks(cfg):
    """Checks between fields, for the stages that have them."""
    has = lambda *names: all(hasattr(cfg, n) for n in names)       # noqa: E731
    problems = []
    world = int(os.environ.get("WORLD_SIZE", 1))
    if has("global_batch", "micro_batch") and cfg.micro_batch >= 1 and cfg.global_batch % (cfg.micro_batch * world):
        problems.append(f"--global_batch={cfg.global_batch}: must be a multiple of micro_batch x processes = "
                        f"{cfg.micro_batch} x {world} (e.g. --micro_batch={max(1, cfg.global_batch // world)})")
    if has("bf16") and cfg.bf16 and "RANK" not in os.environ:
        problems.append("--bf16: needs FSDP's mixed precision: launch with torchrun (--nproc_per_node=1 is fine)")
    if has("device") and cfg.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device=cuda: no CUDA device is available here")
    if has("train_data", "train_subset") and cfg.train_subset and os.path.isfile(cfg.train_data):
        problems.append(f"--train_subset={cfg.train_subset}: applies to an HF dataset (a hub name or a "
                        f"directory), not to the file {cfg.train_data}")
    if has("train_data", "train_split") and os.path.isfile(cfg.train_data) and \
            cfg.train_split != type(cfg).__dataclass_fields__["train_split"].default:
        problems.append(f"--train_split={cfg.train_split}: applies to an HF dataset (a hub name or a directory), "
                        f"not to the file {cfg.train_data}")
    if has("model", "out_dir") and os.path.realpath(cfg.model).startswith(os.path.realpath(cfg.out_dir) + os.sep):
        problems.append(f"--model={cfg.model} lies inside --out_dir={cfg.out_dir}, whose checkpoints and export this "
                        "run would resume from and replace: choose another --out_dir")
    if has("tokenizer", "model") and not cfg.tokenizer and os.path.isfile(cfg.model):
        problems.append(f"--tokenizer is empty but --model={cfg.model} is a config file, which has no tokenizer: "
                        "name a tokenizer.json")
    return problems


def check_config(cfg):
    """Every problem of a stage config at once (shared rules, cross-field checks, the stage's own validate()),
    raised as one ConfigError with a line per problem."""
    problems = check_fields(cfg, **{k: r for k, r in SHARED_RULES.items() if hasattr(cfg, k)})
    problems += _shared_cross_checks(cfg)
    if hasattr(cfg, "validate"):
        problems += cfg.validate() or []
    if problems:
        raise ConfigError("\n  ".join([f"{type(cfg).__name__}: {len(problems)} problem(s)"] + problems))
    return cfg

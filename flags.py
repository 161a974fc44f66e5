"""The command line's flags, generated from TrainConfig's fields: the argparse parser, JSON presets
(`--config FILE`), which flags a mode reads, and docs/flags.md's tables (`python flags.py` prints them).
"""
import argparse
import dataclasses

from config import TrainConfig, read_json_object
from errors import InputError


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Multitask BERT fine-tuning (SST-5, Quora, STS-B).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="a JSON preset of settings (a run's config.json is one); "
                        "flags given here override it")
    groups = {}
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        # argparse %-formats help strings (for %(default)s): a literal % must be written %%.
        kwargs = {"default": field.default, "help": meta["help"].replace("%", "%%")}
        base = _base_type(field.type)
        if "tuple" in str(field.type):
            kwargs.update(nargs="+", type=base, metavar="PATH")
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _optional(base) if _is_optional(field.type) else base
            kwargs["choices"] = meta["choices"]
            if _is_optional(field.type):
                kwargs["metavar"] = base.__name__.upper()
        group.add_argument(f"--{field.name}", **kwargs)
    return parser


# Where a run goes, not what it is: a saved config.json used as a preset leaves these out.
RUN_IDENTITY = ("save_path", "resume", "predictions_dir")


# The only flags --option test and --option ensemble read (test rebuilds the model from the checkpoint's
# config); any other flag given with them would be ignored, so it is refused. --resume reads none.
MODE_FLAGS = {
    "test": ("option", "pretrained_model_name", "data_dir", "max_dev_examples", "device", "amp", "eval_batch_size",
             "eval_both_orders", "predictions_dir"),
    "ensemble": ("option", "ensemble", "ensemble_method", "seed", "data_dir", "save_path", "predictions_dir"),
}


def given_flags(argv: list[str] | None) -> list[str]:
    """The settings named on the command line, whatever their values (`--seed 11711` too), and "config"."""
    parser = build_arg_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # so that only what argv sets appears
    return list(vars(parser.parse_args(argv)))


def load_preset(path: str) -> dict:
    """Settings from a JSON preset (`--config FILE`): any TrainConfig fields, checked by name and type.
    A run's own config.json is a valid preset: its folder settings (RUN_IDENTITY) are left out. Keys
    starting with "_" are comments. Raises InputError naming the file and the key."""
    raw = read_json_object(path, "preset of settings (--config)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    settings = {}
    for key, value in raw.items():
        if key.startswith("_") or key in RUN_IDENTITY:
            continue
        if key not in fields:
            raise InputError(f"--config {path}: unknown setting {key!r} (settings are the flags' names without "
                             f"--; see docs/flags.md)")
        field = fields[key]
        base = _base_type(field.type)
        if "tuple" in str(field.type):  # a string would become a tuple of its characters
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise InputError(f"--config {path}: {key} must be a list of strings, got {value!r}")
            value = tuple(value)
        elif base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not ((value is None and _is_optional(field.type))
                  or (isinstance(value, base) and (base is bool or not isinstance(value, bool)))):
            expected = base.__name__ + (" or null" if _is_optional(field.type) else "")
            raise InputError(f"--config {path}: {key} must be {expected}, got {value!r}")
        if field.metadata["choices"] and value is not None and value not in field.metadata["choices"]:
            raise InputError(f"--config {path}: {key} must be one of {', '.join(field.metadata['choices'])}, "
                             f"got {value!r}")
        settings[key] = value
    return settings


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from flags; `--config FILE` (a JSON preset) sets defaults that the flags override."""
    parser = build_arg_parser()
    preset = parser.parse_known_args(argv)[0].config
    if preset is not None:
        parser.set_defaults(**load_preset(preset))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    given = given_flags(argv)
    if args["resume"] is not None:  # the run's own config.json decides everything else
        ignored = [f"--{k}" for k in given if k != "resume"]
        if ignored:
            parser.error(f"--resume {args['resume']} continues that run with its own settings (its config.json); "
                         f"these would be ignored: {', '.join(ignored)}. Leave them out, or start a new run from "
                         f"its settings with --config {args['resume']}/config.json")
    elif args["option"] in MODE_FLAGS:
        ignored = [f"--{k}" for k in given if k not in MODE_FLAGS[args["option"]]]
        if ignored:
            parser.error(f"--option {args['option']} reads only "
                         f"{', '.join('--' + k for k in MODE_FLAGS[args['option']] if k != 'option')}; these would "
                         f"be ignored: {', '.join(ignored)}")
    elif "ensemble_method" in given:
        parser.error("--ensemble_method is read only by --option ensemble")
    try:
        return TrainConfig(**args)
    except ValueError as e:
        parser.error(f"{e}" + (f" (settings from --config {preset} and the flags)" if preset else ""))


def _is_optional(annotation) -> bool:
    return "None" in str(annotation)


def setting_type(name: str) -> type:
    """bool, int, float or str: the type of TrainConfig's field `name` (without its None)."""
    return _base_type(next(f for f in dataclasses.fields(TrainConfig) if f.name == name).type)


def _base_type(annotation):
    text = str(annotation)
    for candidate in (bool, int, float, str):
        if candidate.__name__ in text.replace("None", ""):
            return candidate
    raise TypeError(f"unsupported config type {annotation}")


def _optional(base):
    """argparse type that also accepts 'none' (so a sweep script can switch a default off)."""
    def convert(text: str):
        return None if text.lower() == "none" else base(text)
    convert.__name__ = base.__name__
    return convert


def flags_markdown() -> str:
    """docs/flags.md's tables, one per --help section (tests/test_docs.py keeps them in sync)."""
    sections: dict[str, list[str]] = {}
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        default = field.default
        shown = ("—" if default is None or default == () else "off" if default is False else "on" if default is True
                 else f"`{default}`")
        choices = f" ({' / '.join(meta['choices'])})" if meta["choices"] else ""
        sections.setdefault(meta["group"], []).append(f"| `--{field.name}` | {shown} | {meta['help']}{choices} |")
    return "\n".join(f"\n**{group}**\n\n| flag | default | what it does |\n|---|---|---|\n" + "\n".join(rows)
                     for group, rows in sections.items())


if __name__ == "__main__":
    print(flags_markdown())  # python flags.py: the tables for docs/flags.md

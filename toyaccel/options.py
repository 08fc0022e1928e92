"""How an option is declared, and everything derived from the declarations: the tables of which option
belongs to what, the types, the command-line spelling, and reading options from a ``--config`` file.

An option is a field of ``toyaccel.config.TrainConfig`` declared with ``option(...)``, which records in
the field's metadata all that is known about it: its help, choices, section (``--help`` group and
``--config`` file section), the workload it belongs to, its default per workload, and whether it is part
of the run's identity (a resume must match it). Nothing else lists options.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from toyaccel.engine.files import require_regular_file
from toyaccel.errors import ToyaccelError

# --help groups and --config file sections, in this order.
SECTION_NAMES = ("data", "model", "optimizer", "run")
ALL_WORKLOADS = "all"
# A default that a named rule (toyaccel.default_rules' DEFAULT_RULES) computes from other options.
BY_RULE = "by rule"
# torch.manual_seed takes 0..2**64-1, and the synthetic text seeds a second generator with seed + 1.
MAX_SEED = 2**64 - 2


def option(
    default: Any,
    help: str,
    *,
    section: str,
    workload: str = ALL_WORKLOADS,
    by_workload: dict[str, Any] | None = None,
    identity: bool = False,
    choices: tuple[str, ...] | None = None,
    described: bool = False,
    data_source: str | None = None,
    only_when_on: bool = False,
    overridden_by: str | None = None,
) -> Any:
    """One option's whole declaration.

    ``default`` is its value for every workload it belongs to, but those named in ``by_workload``;
    ``BY_RULE`` where a rule computes it. ``workload``: the one model family it belongs to ("all": every
    one); given to another, it is refused. ``identity``: it changes what is computed, so a resumed run must
    match the checkpoint in it. ``described``: the start-up line's data description already says it.
    ``data_source``: it takes part only in runs on that kind of data ("file" or "synthetic").
    ``only_when_on``: at 0 (off) it takes no part, as in a run saved before it existed. ``overridden_by``: it
    takes no part where that option is on.

    An option whose default depends on the workload (or a rule) is None until TrainConfig resolves it: None
    there means "not given", and the run's own value replaces it before anything reads it.
    """
    if section not in SECTION_NAMES:
        raise ValueError(f"section must be one of {SECTION_NAMES}, got {section!r}")
    resolved = workload != ALL_WORKLOADS or by_workload is not None or default == BY_RULE
    metadata = {
        "help": help, "section": section, "workload": workload, "identity": identity, "choices": choices,
        "described": described, "data_source": data_source, "resolved": resolved, "only_when_on": only_when_on,
        "overridden_by": overridden_by,
        "default": None if default == BY_RULE else default, "by_workload": dict(by_workload or {}),
    }  # fmt: skip
    return dataclasses.field(default=None if resolved else default, metadata=metadata)


@functools.cache
def declared(cls: type) -> tuple[dataclasses.Field, ...]:
    """The options of ``cls``, in declaration order (fields declared otherwise are internal state)."""
    return tuple(f for f in dataclasses.fields(cls) if "section" in f.metadata)


def option_names(cls: type, **wanted: Any) -> tuple[str, ...]:
    """Names of the options whose metadata has every ``wanted`` value, e.g. ``workload="gpt"``."""
    return tuple(f.name for f in declared(cls) if all(f.metadata[k] == v for k, v in wanted.items()))


def sections(cls: type) -> dict[str, tuple[str, ...]]:
    return {section: option_names(cls, section=section) for section in SECTION_NAMES}


def workload_defaults(cls: type, workload: str) -> dict[str, Any]:
    """What the options of ``workload`` not given default to (rules aside): the declared defaults."""
    return {
        f.name: f.metadata["by_workload"].get(workload, f.metadata["default"])
        for f in declared(cls)
        if f.metadata["resolved"] and belongs_to(f, workload)
    }


def belongs_to(f: dataclasses.Field, workload: str) -> bool:
    return f.metadata["workload"] in (ALL_WORKLOADS, workload)


@functools.cache
def option_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Each option's type from its annotation, as ``(type, whether None is allowed)``:
    ``int | None`` is ``(int, True)``, ``tuple[int, ...]`` is ``(tuple, False)``."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in declared(cls):
        hint = hints[f.name]
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = [m for m in members if m is not type(None)]
        base = typing.get_origin(kinds[0]) or kinds[0]
        found[f.name] = (base, len(kinds) < len(members))
    return found


def flag(name: str) -> str:
    """An option's command-line spelling: ``eval_train`` is ``--eval-train``."""
    return "--" + name.replace("_", "-")


def check_seed(value: int, name: str) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ToyaccelError(f"{name} must be in 0..{MAX_SEED}, got {value}")


def check_count(name: str, value: Any, least: int) -> None:
    """A size read from a file (config.json): an int, at least ``least``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ToyaccelError(f"{name} must be int, got {value!r}")
    if value < least:
        raise ToyaccelError(f"{name} must be at least {least}, got {value}")


def parse_hidden(value: Any) -> tuple[int, ...]:
    """'30,20', [30, 20] or (30, 20) -> (30, 20); '' or [] -> () (a linear model)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ToyaccelError(f"hidden must be comma-separated sizes like 30,20, got {value!r}")
    try:
        sizes = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ToyaccelError(f"hidden must be comma-separated sizes like 30,20, got {value!r}") from None
    if any(s < 1 for s in sizes) or any(isinstance(p, (bool, float)) for p in parts):
        raise ToyaccelError(f"hidden sizes must be positive integers, got {value!r}")
    return sizes


def parse_names(value: Any) -> tuple[str, ...]:
    """'id, name', ['id', 'name'] -> ('id', 'name'); '' or [] -> ()."""
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return tuple(p.strip() for p in value if p.strip())
    raise ToyaccelError(f"ignore_columns must be comma-separated column names like id,name, got {value!r}")


def unset(name: str, value: Any) -> bool:
    return value is None or value == [] or value == "" or (name == "val_fraction" and not value)


def with_absolute_paths(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the --data, --val-data and --init-from paths made absolute (relative ones are relative
    to the current directory): config.json records them so, and a run evaluates from anywhere."""
    resolved = dict(options)
    for name in ("data", "val_data", "init_from"):
        value = resolved.get(name)
        if isinstance(value, str) and value and not (name == "data" and value in ("toy", "synthetic")):
            resolved[name] = os.path.abspath(value)
    return resolved


def check_output_dir(path: str) -> None:
    """Every file of a run goes inside its own folder: an empty name would put them in the current
    directory and the filesystem root, the root would mix them with the system's."""
    if not path.strip():
        raise ToyaccelError(f"--output-dir {path!r} is empty: name the folder the run's files go to, e.g. runs/mine")
    if Path(path).resolve() == Path(Path(path).resolve().anchor):
        raise ToyaccelError(
            f"--output-dir {path} is the filesystem root: name a folder of the run's own, e.g. /runs/mine"
        )


def read_options_file(path: str | Path, known: tuple[str, ...]) -> dict[str, Any]:
    """Options from a YAML or JSON file: keys are among ``known`` (dashes or underscores), flat or
    grouped by section."""
    path = Path(path)
    require_regular_file(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ToyaccelError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml  # accelerate depends on PyYAML

            values = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser error becomes one line naming the file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToyaccelError(f"config file {path} does not parse: {first_line}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ToyaccelError(f"config file {path} must hold a mapping of option: value")
    values = flatten_sections(path, values)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ToyaccelError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values


def flatten_sections(path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """A config file may group options under data:, model:, optimizer: and run: (as --help does) or
    list them flat; either way each option is named once."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        # "model" is both a section and an option (--model gpt): a mapping is the section.
        group = value if key in SECTION_NAMES and isinstance(value, dict) else {key: value}
        for name, v in group.items():
            name = str(name).replace("-", "_")
            if name in flat:
                raise ToyaccelError(f"config file {path}: option {name} is given twice")
            flat[name] = v
    return flat

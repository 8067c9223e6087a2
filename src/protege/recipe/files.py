"""Recipe files: the safe YAML reader (no duplicate keys, bounded depth and size), ``--set`` overrides, and
validation errors turned into one line that names the file (or option), the field and the allowed values."""
from __future__ import annotations

import difflib
import stat
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import RecipeError
from ..files import write_atomic
from .schema import MAX_BYTES, MAX_DEPTH, MAX_VALUES, RECIPES, Recipe, _show, _value


def _section(annotation: Any) -> Optional[type[BaseModel]]:
    """The model class a field holds (``TrainConfig``, ``Optional[TrainConfig]``, ``list[FeatureTerm]``), or None."""
    inner = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
    return inner[0] if inner else None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        if isinstance(part, int):  # an item of a list: the list's model applies
            continue
        inner = _section(getattr(model.model_fields.get(str(part)), "annotation", None))
        if inner is None:
            return []
        model = inner
    return sorted(model.model_fields)


def _literal(model: type[BaseModel], loc: tuple) -> tuple:
    """The values a Literal field at ``loc`` of ``model`` allows (() when it is not a Literal field there)."""
    *parents, last = [p for p in loc if not isinstance(p, int)] or [""]
    for part in parents:
        model = _section(getattr(model.model_fields.get(str(part)), "annotation", None))
        if model is None:
            return ()
    annotation = getattr(model.model_fields.get(str(last)), "annotation", None)
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of ``model`` as a dotted path (``train.epochs``), sections included, list items not."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        inner = _section(field.annotation)
        if inner is not None and get_origin(field.annotation) is not list:
            paths += _field_paths(inner, f"{prefix}{name}.")
    return paths


def _nearest(loc: tuple, model: type[BaseModel], dotted: bool) -> Optional[str]:
    """The field an unknown one probably meant: a sibling spelled alike (by its name, or its dotted path when
    ``dotted``), else a field of that very name elsewhere, else the dotted path spelled most alike."""
    parent, key = [str(p) for p in loc[:-1]], str(loc[-1])
    near = difflib.get_close_matches(key, _allowed_keys(model, loc[:-1]), n=1)
    if near:
        return ".".join([*parent, near[0]]) if dotted else near[0]
    paths = _field_paths(model)
    same_name = sorted((p for p in paths if p.rsplit(".", 1)[-1] == key), key=len)
    near = same_name or difflib.get_close_matches(".".join([*parent, key]), paths, n=1)
    return near[0] if near else None


def _describe(err: dict[str, Any], model: type[BaseModel], dotted: bool = False) -> str:
    """One pydantic error as one line naming the field (``dotted``: suggest full dotted paths, as --set takes)."""
    loc = ".".join(_show(p) for p in err["loc"]) if err["loc"] else "(top level)"
    kind, value = err["type"], _value(err.get("input"))
    if kind == "extra_forbidden":
        other = [task for task, cls in RECIPES.items() if cls is not model and loc in _field_paths(cls)]
        if other:  # a field of another task's recipe (distill.topk in a classification recipe)
            return f"field '{loc}' is for task: {other[0]}, not for task: {_task(model)}; remove it (or set task: {other[0]})"
        near = _nearest(err["loc"], model, dotted)
        hint = f"did you mean '{near}'? " if near else ""
        return f"unknown field '{loc}'; {hint}allowed: {', '.join(_allowed_keys(model, err['loc'][:-1]))}"
    if kind == "literal_error":
        other = [task for task, cls in RECIPES.items() if cls is not model and err.get("input") in _literal(cls, err["loc"])]
        if other:  # a value of another task's recipe (distill.response: uld in a classification recipe)
            return (f"field '{loc}' is {value}, which is for task: {other[0]}; allowed values for task: {_task(model)}: "
                    f"{err['ctx']['expected']}")
        return f"field '{loc}' is {value}; allowed values: {err['ctx']['expected']}"
    if kind == "value_error":  # a check of a section (or of the whole recipe: no loc), its message names the fields
        why = err["msg"].removeprefix("Value error, ")
        return f"{loc}: {why}" if err["loc"] else why
    if kind == "missing":
        return f"field '{loc}' is required"
    return f"field '{loc}' is {value}: {err['msg'][0].lower() + err['msg'][1:]}"


def _task(model: type[BaseModel]) -> str:
    return next((task for task, cls in RECIPES.items() if cls is model), "?")


def _blame(loc: tuple, source: str, overrides: list[str]) -> tuple[str, bool]:
    """Who an error at ``loc`` is put down to: the last --set item that set that field or a section holding it;
    the file "with" a --set item that set a field inside it (a check of the whole section); else the file.
    Also whether suggestions should be dotted paths (as --set takes them)."""
    at = [str(p) for p in loc]
    for item in reversed(overrides):
        key = _override_key(item)
        if at and at[:len(key)] == key:
            return f"--set {_show(item)}", True
        if at and key[:len(at)] == at:
            return f"{source} with --set {_show(item)}", False
    return source, False


def _without_other_task_defaults(data: dict, cls: type[Recipe]) -> dict:
    """``data`` without the ``distill`` fields of another task that hold that task's default: recipe.yaml files written
    before each task had its own ``distill`` type list every field of both (``topk: null`` in a classification run)."""
    distill = data.get("distill")
    if not isinstance(distill, dict):
        return data
    own = cls.model_fields["distill"].annotation.model_fields
    others = {name: f for other in RECIPES.values() if other is not cls
              for name, f in other.model_fields["distill"].annotation.model_fields.items() if name not in own}
    kept = {k: v for k, v in distill.items()
            if not (k in others and v == others[k].get_default(call_default_factory=True))}
    return {**data, "distill": kept}


def parse_recipe(data: Any, source: str = "<recipe>", overrides: Optional[list[str]] = None) -> Recipe:
    """Validate a mapping into a Recipe; raise RecipeError naming the source (or the ``--set`` item that gave the
    bad value), the field and the fix."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    task = data.get("task", "classify")
    if not isinstance(task, str) or task not in RECIPES:
        who, _ = _blame(("task",), source, overrides or [])
        raise RecipeError(f"{who}: field 'task' is {_value(task)}; allowed values: {', '.join(map(repr, RECIPES))}")
    cls = RECIPES[task]
    try:
        return cls.model_validate(_without_other_task_defaults(data, cls))
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        who, dotted = _blame(errors[0]["loc"], source, overrides or [])
        raise RecipeError(f"{who}: {_describe(errors[0], cls, dotted)}{more}") from None


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a recipe must not hold; ``problem`` says why and what to do."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing what it would otherwise let through quietly or crash on: a key given twice in
    one mapping (the last one would silently win) and nesting deep enough to exhaust Python's stack."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(problem=f"nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}; a recipe "
                                       f"needs only a few levels", problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden, that is their point
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the safe loader refuses it below
                continue
            if first is not key_node:
                raise _Refused(problem=f"key {_value(key, 40)} is given twice in one mapping (lines "
                                       f"{first.start_mark.line + 1} and {key_node.start_mark.line + 1}); keep one "
                                       f"(YAML would silently use the last)", problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str, bad: str, fix: str) -> Any:
    """YAML text -> Python values with the recipe loader; any problem is a RecipeError naming ``where``
    (``bad`` says what is wrong with text that does not parse, ``fix`` what to do)."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except _Refused as e:
        raise RecipeError(f"{where}: {e.problem}") from None
    except yaml.reader.ReaderError as e:
        char = _show(chr(e.character)) if isinstance(e.character, int) else _show(e.character)
        raise RecipeError(f"{where}: the character '{char}' (position {e.position}) is not allowed in YAML; remove it") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = f" ({_show(e.problem)})" if getattr(e, "problem", None) else ""
        raise RecipeError(f"{where}: {bad}{at}{problem}; {fix}") from None
    except RecursionError:  # e.g. a long chain of `<<: *alias` merges
        raise RecipeError(f"{where}: nested too deeply for YAML to read; a recipe needs only a few levels") from None
    except (ValueError, OverflowError, TypeError) as e:  # e.g. a date 2024-13-45, an integer of 5000 digits
        raise RecipeError(f"{where}: a value YAML cannot convert ({_show(e, 60)}); check the numbers and dates") from None


def _check_size(data: Any, where: str) -> None:
    """Refuse values nested too deeply or too many once YAML aliases are expanded (an alias may refer to the
    mapping that holds it, or repeat a list of lists of ... many times over), which later steps could not handle."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise RecipeError(f"{where}: nested more than {MAX_DEPTH} levels deep (or a YAML alias refers to itself); "
                              f"a recipe needs only a few levels")
        if count > MAX_VALUES:
            raise RecipeError(f"{where}: holds more than {MAX_VALUES:,} values once YAML aliases are expanded; "
                              f"a recipe needs a few dozen")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]


def _override_key(item: str) -> list[str]:
    """The field path of a ``--set KEY=VALUE`` item (``train.epochs`` -> ['train', 'epochs']), checked."""
    if not isinstance(item, str):  # the Python API
        raise RecipeError(f"override {_value(item, 40)} is a {type(item).__name__}; give 'KEY=VALUE' strings, "
                          f"e.g. 'train.epochs=3'")
    if "=" not in item:
        raise RecipeError(f"--set {_show(item)}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key = item.split("=", 1)[0].strip()
    if not key:
        raise RecipeError(f"--set {_show(item)}: no field name before '='; expected KEY=VALUE, e.g. --set train.epochs=3")
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise RecipeError(f"--set {_show(item)}: the field name '{_show(key)}' has an empty part (a dot at an end, or "
                          f"two in a row); write it as section.field, e.g. --set train.epochs=3")
    if len(parts) > MAX_DEPTH:
        raise RecipeError(f"--set {_show(item)}: the field name has more than {MAX_DEPTH} parts; a recipe needs "
                          f"only a few levels")
    return parts


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; the value is parsed as YAML (numbers, booleans, lists).

    A number in the path picks an item of a list (``distill.features.0.weight=2``); a missing or empty section
    is created.
    """
    for item in overrides:
        parts = _override_key(item)
        key, raw = item.split("=", 1)
        where = f"--set {_show(item)}"
        quoted = f"--set '{_show(key.strip())}=\"{_show(raw, 40)}\"'"
        value = _parse_yaml(raw, where, "the value is not valid YAML", f"quote the value, e.g. {quoted}")
        _check_size(value, where)
        node: Any = data
        for i, part in enumerate(parts):
            parent = ".".join(parts[:i])
            if isinstance(node, list):
                if not (part.isascii() and part.isdigit() and len(part) < 10 and int(part) < len(node)):
                    raise RecipeError(f"{where}: '{_show(parent)}' is a list of {len(node)} item(s); '{_show(part)}' is "
                                      f"not an index of it (0, 1, ...)")
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError(f"{where}: '{_show(parent)}' is {_value(node, 40)}, not a section, so it has no field "
                                  f"'{_show(part)}'; set '{_show(parent)}' itself")
            if i == len(parts) - 1:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:  # absent, or `prune:` left empty
                    node[part] = {}
                node = node[part]
    return data


def _read_text(path: Path, name: str) -> str:
    """The recipe file's text; a missing, unreadable, oversized or non-UTF-8 file is a RecipeError naming it."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise RecipeError(f"recipe file '{name}' not found; give the path to a .yaml recipe (see recipes/)") from None
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission on a folder
        why = getattr(e, "strerror", None) or str(e)
        raise RecipeError(f"recipe file '{name}' cannot be looked up ({_show(why)}); give the path to a .yaml recipe "
                          f"(see recipes/)") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecipeError(f"'{name}' is a folder; give the path to a .yaml recipe file (see recipes/)")
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(f"'{name}' is not a regular file; give the path to a .yaml recipe file (see recipes/)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"recipe file '{name}' cannot be read ({_show(e.strerror or e)}); check its permissions") from None
    if len(raw) > MAX_BYTES:
        raise RecipeError(f"'{name}' is larger than {MAX_BYTES // 1024} KiB, too large for a recipe; give the path to "
                          f"a .yaml recipe (see recipes/)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{name}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); a recipe is YAML "
                          f"text: save it as UTF-8") from None


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    """Read a YAML recipe (safe loader only), apply overrides and validate."""
    path = Path(path)
    name = _show(path, 120)
    data = _parse_yaml(_read_text(path, name), name, "malformed YAML", "fix the syntax (indentation, colons, quotes)")
    if data is None:
        raise RecipeError(f"{name} is empty; a recipe needs at least `teacher` and `student` (see recipes/)")
    _check_size(data, name)
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return parse_recipe(data, name, overrides)


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe atomically: a full disk leaves the earlier recipe.yaml (if any) intact."""

    write_atomic(path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), "then run the command again")

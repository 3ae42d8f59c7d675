"""One conversion in progress: the zero config being written and what was said about every key.

Every key of the accelerate file ends in exactly one of three outcomes, each a method here:

* ``mapped``      the key becomes a key of the zero config (a DeepSpeed JSON file, as hf_zero reads);
* ``not_needed``  nothing to write: hf_zero does it anyway, or it is a launcher or script flag
                  (collected in ``launch_flags`` / ``script_flags`` for the suggested command);
* ``refuse``      this version cannot run what the key asks for: an ``AccelerateConfigError``
                  naming the file, the key, its value and why, raised at once.

A section's table (``Rule`` rows, see deepspeed_section.py, fsdp_section.py, top_level.py) says
which outcome each key has; the docs' key-by-key table is generated from the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn

from hf_zero.config.errors import show


class AccelerateConfigError(ValueError):
    """The accelerate file cannot be converted (a key refused, a bad value, an unreadable file)."""


class Rule(NamedTuple):
    """How one key of an accelerate config file is converted."""

    becomes: str
    """What the key becomes, in words, for the docs (``zero_optimization.stage``; ``not needed: ...``)."""
    convert: Callable[["Conversion", str, Any], None]
    """Records the outcome for the key as written and its value (calls one of Conversion's three)."""


class Note(NamedTuple):
    outcome: str  # "mapped" or "not needed"
    key: str
    value: Any
    text: str

    def line(self) -> str:
        return f"  {self.outcome:<10}  {self.key} = {show(self.value)}: {self.text}"


class Conversion:
    """The zero config (DeepSpeed JSON) being built from one accelerate file, and its notes."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.config: dict[str, Any] = {}
        self.notes: list[Note] = []
        self.launch_flags: list[str] = []
        self.script_flags: list[str] = []
        self.stage: int | None = None  # set by the section before the keys that depend on it
        self.num_machines = 1  # set by num_machines before num_processes, machine_rank and gpu_ids read it

    def mapped(self, key: str, value: Any, path: str, written: Any, why: str = "") -> None:
        """``key`` becomes ``path`` = ``written`` in the zero config."""
        self.put(path, written)
        self.notes.append(Note("mapped", key, value, f"{path} = {show(written)}" + (f" ({why})" if why else "")))

    def not_needed(self, key: str, value: Any, why: str, *, launch: Sequence[str] = (),
                   script: Sequence[str] = ()) -> None:
        """Nothing to write for ``key``; ``launch``/``script`` flags join the suggested command."""
        self.launch_flags += launch
        self.script_flags += [flag for flag in script if flag not in self.script_flags]
        self.notes.append(Note("not needed", key, value, why))

    def refuse(self, key: str, value: Any, why: str) -> NoReturn:
        raise AccelerateConfigError(f"{key} = {show(value)} in {self.source}: {why}")

    def put(self, path: str, value: Any) -> None:
        """Set the dotted DeepSpeed ``path`` in the config, creating its blocks."""
        *blocks, last = path.split(".")
        node = self.config
        for block in blocks:
            node = node.setdefault(block, {})
        node[last] = value

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    # ---- value checks shared by the sections -----------------------------------------------

    def choice(self, key: str, value: Any, allowed: Sequence[Any]) -> Any:
        """``value`` (compared without case for strings) as spelled in ``allowed``, or refused."""
        for option in allowed:
            if value == option or (isinstance(value, str) and isinstance(option, str)
                                   and value.lower() == option.lower()):
                return option
        self.refuse(key, value, "not a value accelerate accepts here; allowed: " + ", ".join(map(show, allowed)))

    def boolean(self, key: str, value: Any) -> bool:
        """A YAML boolean, or the strings accelerate writes for one ("true", "false", "yes", "no")."""
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        self.refuse(key, value, "not a boolean; allowed: true or false")

    def integer(self, key: str, value: Any, *, minimum: int) -> int:
        number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
            self.refuse(key, value, f"not an integer >= {minimum}")
        return number


def unknown(conversion: Conversion, key: str, value: Any, known: Sequence[str]) -> NoReturn:
    """Refuse a key no table knows, naming the closest known one."""
    import difflib

    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in known], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    conversion.refuse(key, value, f"not a key of accelerate's config file that hf-zero convert-accelerate knows{hint} "
                                  "(known: " + ", ".join(k.rsplit(".", 1)[-1] for k in known) + ")")


def table_markdown(prefix: str, rules: dict[str, Rule]) -> list[str]:
    """The docs' rows for one table: ``| `prefix.key` | becomes |``."""
    return [f"| `{prefix}{key}` | {rule.becomes.replace('|', chr(92) + '|')} |" for key, rule in rules.items()]

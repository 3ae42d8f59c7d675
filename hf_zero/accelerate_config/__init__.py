"""``hf-zero convert-accelerate``: an accelerate config file (``accelerate config``'s YAML) -> a zero config.

The file's ``deepspeed_config`` section (inline keys, or a ``deepspeed_config_file``) or its
``fsdp_config`` section becomes a DeepSpeed JSON file, which hf_zero reads as its zero config; its
launcher settings become the flags of a suggested ``hf-zero launch`` command. Every key is either
mapped, noted as not needed (with what replaces it), or refused with the reason, before anything is
written: the tables are ``top_level.RULES``, ``deepspeed_section.RULES``, ``fsdp_section.RULES`` and
``parallelism_section.RULES`` (the top-level ``parallelism_config``: tp and sp sizes),
and docs/from-fsdp-accelerate.md's key-by-key table is generated from them (:func:`mapping_markdown`).

The YAML is read with ``yaml.safe_load`` (plain data, no tags that build objects) from a regular file
of at most 1 MiB (``hf_zero/config/small_file.py``); PyYAML comes with transformers and accelerate.
The result is loaded with ``load_config`` before it is returned, so what is written is a config hf_zero
accepts (and what this version cannot run is refused: ``config/unsupported.py``).
"""

from __future__ import annotations

from typing import Any

from hf_zero.accelerate_config import deepspeed_section, fsdp_section, parallelism_section, top_level
from hf_zero.accelerate_config.conversion import AccelerateConfigError, Conversion, table_markdown, unknown
from hf_zero.config.small_file import read_small_text


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path`` (safe_load; a regular file of at most 1 MiB)."""
    import yaml

    text = read_small_text(path, what="accelerate config file", error=AccelerateConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise AccelerateConfigError(f"invalid YAML in {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise AccelerateConfigError(f"the top level of {path} must be a mapping of accelerate's keys, not "
                                    f"{type(data).__name__}")
    return data


def convert_mapping(data: dict[str, Any], source: str) -> Conversion:
    """Convert a parsed accelerate config; raises AccelerateConfigError (or ConfigError) naming the key."""
    conv = Conversion(source)
    for key, value in data.items():
        if key not in top_level.RULES:
            unknown(conv, str(key), value, list(top_level.RULES))
    section = _section_name(conv, data)
    conv.not_needed("distributed_type", data.get("distributed_type"), f"the {section} section is converted")
    for key, rule in top_level.RULES.items():
        if key in data and key not in ("distributed_type", "mixed_precision", section):
            rule.convert(conv, key, data[key])
    body = data[section]
    if not isinstance(body, dict):
        conv.refuse(section, body, "not a mapping of keys")
    (deepspeed_section if section == deepspeed_section.SECTION else fsdp_section).convert(conv, body)
    top_level.precision(conv, data.get("mixed_precision"))
    _check(conv)
    return conv


def convert_file(path: str) -> Conversion:
    return convert_mapping(read_yaml(path), path)


def _section_name(conv: Conversion, data: dict[str, Any]) -> str:
    kind = data.get("distributed_type")
    if kind is None:  # no type: the one non-empty section, if there is one
        present = [name for name in top_level.SECTIONS.values() if data.get(name)]
        if len(present) == 1:
            return present[0]
        conv.refuse("distributed_type", kind, "missing; allowed: DEEPSPEED (with deepspeed_config) or FSDP (with "
                                              "fsdp_config)")
    name = top_level.SECTIONS.get(str(kind).upper())
    if name is None:
        conv.refuse("distributed_type", kind, "nothing sharded to convert; allowed: DEEPSPEED or FSDP. For plain data "
                                              "parallel run the script without a zero config, or pick a stage "
                                              "(docs/choosing-a-stage.md)")
    if data.get(name) is None:
        conv.refuse(name, None, f"missing: distributed_type {kind} needs this section")
    return name


def _check(conv: Conversion) -> None:
    """Load the result as hf_zero will (and refuse what this version cannot run)."""
    from hf_zero.config import load_config
    from hf_zero.config.unsupported import refuse

    refuse(load_config(conv.config, source=f"the zero config converted from {conv.source}"))


def mapping_markdown() -> str:
    """The key-by-key tables of docs/from-fsdp-accelerate.md (between its generated-table markers)."""
    out = ["| accelerate key | in hf_zero |", "|---|---|"]
    out += table_markdown("", top_level.RULES)
    out += table_markdown("deepspeed_config.", deepspeed_section.RULES)
    out += table_markdown("fsdp_config.", fsdp_section.RULES)
    out += table_markdown("parallelism_config.", parallelism_section.RULES)
    return "\n".join(out) + "\n"


__all__ = ["AccelerateConfigError", "Conversion", "convert_file", "convert_mapping", "mapping_markdown", "read_yaml"]

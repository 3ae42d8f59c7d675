"""Installed torch / transformers / accelerate against the ranges hf-zero declares.

The ranges are read from the installed distribution's metadata
(``importlib.metadata.requires("hf-zero")``, i.e. pyproject.toml's ``dependencies``), so they
are never copied here.
"""

from __future__ import annotations

import importlib.metadata as metadata

from hf_zero.doctor.result import CheckResult, failed, passed, skipped

DISTRIBUTION = "hf-zero"
CHECKED = ("torch", "transformers", "accelerate")


def declared_requirements(distribution: str = DISTRIBUTION) -> dict[str, str] | None:
    """Package name (normalized) -> specifier string (``">=5.17,<6"``) of the base dependencies;
    extras (``extra == "test"``) are left out. None if ``distribution`` is not installed."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        lines = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    out: dict[str, str] = {}
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out[_normalize(req.name)] = str(req.specifier)
    return out


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def check_version(package: str, specifier: str, installed: str | None) -> CheckResult:
    """FAIL if ``installed`` is missing or outside ``specifier`` (pre-releases and local
    versions such as ``2.13.0+cpu`` count as their release)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    name = f"version {package}"
    wanted = f"{package}{specifier}"
    if installed is None:
        return failed(name, f"{package} is not installed; hf-zero needs {wanted}",
                      f"pip install '{wanted}'")
    try:
        ok = SpecifierSet(specifier).contains(Version(installed), prereleases=True)
    except (InvalidSpecifier, InvalidVersion) as error:
        return skipped(name, f"cannot compare {package} {installed} with {specifier!r}: {error}")
    if not ok:
        return failed(name, f"{package} {installed} is installed; hf-zero needs {wanted}",
                      f"pip install '{wanted}' (in the environment every node runs)")
    return passed(name, f"{package} {installed} ({wanted})")


def check_versions(packages: tuple[str, ...] = CHECKED) -> list[CheckResult]:
    """One row per package; one SKIP row if hf-zero's metadata is not installed."""
    declared = declared_requirements()
    if declared is None:
        return [skipped("versions", f"the {DISTRIBUTION} distribution is not installed (running from a source "
                                    "tree?), so its version ranges are unknown; pip install -e . to check them")]
    results = []
    for package in packages:
        spec = declared.get(_normalize(package))
        if spec is None:
            results.append(skipped(f"version {package}", f"{DISTRIBUTION} declares no requirement on {package}"))
            continue
        results.append(check_version(package, spec, installed_version(package)))
    return results

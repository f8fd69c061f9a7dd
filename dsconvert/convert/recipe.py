"""Mixed recipes: which scheme each quantizable module gets (compressed-tensors config groups).

A recipe is a default scheme (or None: keep in BF16) plus rules ``(targets, scheme)``. Targets are exact module
names or ``re:`` regular expressions matched from the start of the module name, as compressed-tensors and vLLM
match ``config_groups[*].targets``. Sources of rules, combined in this order:

* ``--preset NAME`` (:data:`PRESETS`; the rest of the model stays BF16);
* ``--recipe FILE`` (YAML or JSON, schema in :func:`load_recipe`);
* ``--scheme-for REGEX=SCHEME`` (repeatable; ``SCHEME`` may be ``BF16`` to keep the matches).

A module matched by two rules is refused (exit 2) rather than resolved by order: the written ``targets`` must
select the same modules in every loader. Fused groups ({q_a_proj, kv_a_proj_with_mqa}, {gate_proj, up_proj}, all
routed experts of a layer) must get one scheme (docs/int-formats.md §4, §14).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UsageError
from .policy import fused_group, module_of

__all__ = ["Rule", "Recipe", "PRESETS", "KEEP", "parse_scheme_for", "load_recipe", "build_recipe",
           "check_fused_schemes"]

#: Scheme names that mean "keep this module in BF16".
KEEP = ("BF16", "NONE", "KEEP")

ROUTED_EXPERTS = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"
ATTENTION = r"re:.*self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$"
# the same families by DeepSeek-V4 release names: presets name V3's, :func:`for_v4` swaps them
V4_FAMILIES = {ROUTED_EXPERTS: r"re:.*ffn\.experts\.\d+\.w[123]$",
               ATTENTION: r"re:.*attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)$"}


@dataclass(frozen=True)
class Rule:
    """Modules matching any of ``targets`` get ``scheme`` (None = BF16)."""

    targets: tuple[str, ...]
    scheme: str | None
    origin: str  # for messages: "--scheme-for", "--preset experts-mxfp4", "recipe.yaml"

    def matches(self, module: str) -> bool:
        for t in self.targets:
            if t.startswith("re:"):
                if re.match(t[3:], module):
                    return True
            elif t == module:
                return True
        return False


#: name -> (rules, description). Every preset keeps the rest of the model in BF16.
PRESETS: dict[str, tuple[list[tuple[str, str]], str]] = {
    "experts-w4a16": ([(ROUTED_EXPERTS, "W4A16")], "routed experts INT4 W4A16 (group 128), the rest BF16"),
    "experts-nvfp4-attn-fp8": ([(ROUTED_EXPERTS, "NVFP4"), (ATTENTION, "FP8_BLOCK")],
                               "routed experts NVFP4, attention FP8_BLOCK, the rest BF16 (Blackwell)"),
    "experts-mxfp4": ([(ROUTED_EXPERTS, "MXFP4")], "routed experts MXFP4, the rest BF16 (AMD MI350/MI355)"),
}


@dataclass
class Recipe:
    """``scheme_for(module)`` -> scheme name or None (BF16)."""

    default: str | None
    rules: list[Rule] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        return bool(self.rules)

    def scheme_for(self, module: str) -> str | None:
        """The scheme of ``module``.

        Raises:
            UsageError: two rules match it (names both and the module).
        """
        hits = [r for r in self.rules if r.matches(module)]
        if len(hits) > 1:
            a, b = hits[0], hits[1]
            raise UsageError(f"module {module!r} is matched by two recipe rules: {list(a.targets)} -> "
                             f"{a.scheme or 'BF16'} ({a.origin}) and {list(b.targets)} -> {b.scheme or 'BF16'} "
                             f"({b.origin})", hint="make the patterns disjoint (a module gets exactly one scheme)")
        return hits[0].scheme if hits else self.default

    def unmatched_rules(self, modules: list[str]) -> list[Rule]:
        return [r for r in self.rules if not any(r.matches(m) for m in modules)]


def _scheme_name(s: str | None, where: str) -> str | None:
    if s is None:
        return None
    if not isinstance(s, str) or not s.strip():
        raise UsageError(f"{where}: scheme must be a name, got {s!r}")
    return None if s.strip().upper() in KEEP else s.strip()


def _targets(t, where: str) -> tuple[str, ...]:
    ts = [t] if isinstance(t, str) else t
    if not isinstance(ts, list) or not ts or not all(isinstance(x, str) and x for x in ts):
        raise UsageError(f"{where}: targets must be a module name, a 're:' regex, or a list of them; got {t!r}")
    for x in ts:
        if x.startswith("re:"):
            try:
                re.compile(x[3:])
            except re.error as e:
                raise UsageError(f"{where}: {x!r} is not a valid regular expression ({e})") from e
    return tuple(ts)


def parse_scheme_for(value: str) -> Rule:
    """``REGEX=SCHEME`` -> Rule(``re:REGEX``); split at the last ``=``; a leading ``re:`` is accepted.

    Raises:
        UsageError: no ``=``, an empty side, or an invalid regex.
    """
    regex, sep, scheme = value.rpartition("=")
    if not sep or not regex or not scheme:
        raise UsageError(f"--scheme-for {value!r}: expected REGEX=SCHEME",
                         hint=r"e.g. --scheme-for '.*mlp\.experts\..*=NVFP4' or '.*kv_b_proj$=BF16'")
    target = regex if regex.startswith("re:") else "re:" + regex
    return Rule(_targets(target, f"--scheme-for {value!r}"), _scheme_name(scheme, f"--scheme-for {value!r}"),
                "--scheme-for")


def load_recipe(path: Path) -> tuple[str | None, list[Rule], bool]:
    """Read a recipe file (``.yaml``/``.yml`` or ``.json``).

    Schema::

        default: W4A16          # optional; scheme for modules no rule matches; BF16/null = keep (default)
        rules:                  # applied to quantizable linears only; a module may match at most one rule
          - targets: "re:.*mlp\\.experts\\..*"   # a name, a 're:' regex, or a list of them
            scheme: NVFP4                       # any registered scheme, or BF16 to keep
          - targets: ["model.layers.0.self_attn.kv_b_proj"]
            scheme: BF16

    Returns:
        ``(default, rules, default_given)``.

    Raises:
        UsageError: unreadable file, bad syntax, unknown keys, wrong types (exit 2).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--recipe {path}: cannot read it ({e.strerror})") from e
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise UsageError(f"--recipe {path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}"
                         f" ({e})") from e
    if not isinstance(doc, dict) or set(doc) - {"default", "rules"}:
        extra = sorted(set(doc) - {"default", "rules"}) if isinstance(doc, dict) else None
        raise UsageError(f"--recipe {path}: expected a mapping with keys 'default' and 'rules'"
                         + (f", got unknown key(s) {extra}" if extra else ""),
                         hint="see `dsconvert quantize --help` and the README's recipe section")
    rules = []
    for i, r in enumerate(doc.get("rules") or []):
        where = f"--recipe {path}: rules[{i}]"
        if not isinstance(r, dict) or set(r) != {"targets", "scheme"}:
            raise UsageError(f"{where}: each rule needs exactly 'targets' and 'scheme', got {r!r}")
        rules.append(Rule(_targets(r["targets"], where), _scheme_name(r["scheme"], where), str(path)))
    return _scheme_name(doc.get("default"), f"--recipe {path}: default"), rules, "default" in doc


def build_recipe(scheme: str | None, preset: str | None = None, recipe_file: Path | None = None,
                 scheme_for: list[str] | None = None) -> Recipe:
    """Combine ``--scheme`` (the default), ``--preset``, ``--recipe`` and ``--scheme-for``.

    A preset or a recipe without ``default`` keeps unmatched modules in BF16; ``--scheme`` given together
    with them sets the default explicitly (pass None when the user did not give it).

    Raises:
        UsageError: unknown preset (listing them), recipe file problems, a bad ``--scheme-for``.
    """
    rules: list[Rule] = []
    recipe_default, recipe_default_given = None, False
    if preset:
        key = preset.strip().lower()
        if key not in PRESETS:
            raise UsageError(f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        rules += [Rule((t,), s, f"--preset {key}") for t, s in PRESETS[key][0]]
    if recipe_file is not None:
        recipe_default, rs, recipe_default_given = load_recipe(recipe_file)
        rules += rs
    rules += [parse_scheme_for(v) for v in scheme_for or []]
    if scheme is not None:
        default = _scheme_name(scheme, "--scheme")
    elif recipe_default_given:
        default = recipe_default
    elif preset or recipe_file is not None:
        default = None  # presets and recipes keep what they do not name in BF16
    else:
        default = "W4A16"
    return Recipe(default, rules)


def check_fused_schemes(decisions: dict[str, str | None]) -> None:
    """Refuse a fused group whose members would get different schemes.

    Args:
        decisions: quantizable weight name -> scheme name (None = BF16).

    Raises:
        UsageError (exit 2): naming the group and two members with their schemes.
    """
    groups: dict[str, dict[str | None, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, s in decisions.items():
        g = fused_group(name)
        if g is not None:
            groups[g][s].append(module_of(name))
    for g, by in groups.items():
        if len(by) > 1:
            (s1, m1), (s2, m2) = list(by.items())[:2]
            counts = ", ".join(f"{len(v)} {k or 'BF16'}" for k, v in by.items())
            raise UsageError(f"{g} must share one scheme, but {m1[0]} would get {s1 or 'BF16'} and {m2[0]} "
                             f"{s2 or 'BF16'} ({counts})",
                             hint="serving engines fuse these layers: give every member the same scheme "
                                  "(widen or narrow the --scheme-for / recipe pattern)")


def for_v4(recipe: Recipe) -> Recipe:
    """``recipe`` with the presets' V3 family patterns (:data:`ROUTED_EXPERTS`, :data:`ATTENTION`) replaced by
    their DeepSeek-V4 release-name equivalents (:data:`V4_FAMILIES`); user patterns are kept as given."""
    return replace(recipe, rules=[replace(r, targets=tuple(V4_FAMILIES.get(t, t) for t in r.targets))
                                  for r in recipe.rules])

"""Named per-tensor GGUF type recipes for DeepSeek-V3/R1 (``dsconvert gguf --recipe NAME``), and the
``--tensor-type-file`` reader.

A recipe is data: a llama-quantize file type (the mix every unmatched tensor follows, and the file's
``general.file_type``), ``PATTERN=TYPE`` overrides in llama-quantize's ``--tensor-type`` syntax (a regex searched in
the GGUF tensor name, first match wins), the token embedding and output included (as rules, so llama.cpp's shape
fallback applies to them, which it does not to ``--token-embedding-type``). The user's own ``--tensor-type`` rules
come before a recipe's, so any one tensor can still be changed; ``--output-tensor-type`` and
``--token-embedding-type`` win over the recipe's rules.

The shape of every low-bit DeepSeek recipe comes from where the bytes and the sensitivity are (docs/gguf-deepseek2.md
§6): the routed experts hold ~88 % of the 671B weights, so they carry the low-bit type, with ``ffn_down_exps`` one
step higher (the down projection is the most sensitive expert matrix); attention, the shared experts and the dense
FFN layers (``first_k_dense_replace``, layers 0-2 in V3) are a small part of the bytes and stay at 4-6 bits;
norms, the router (``ffn_gate_inp``) and its bias (``exp_probs_b``) are never quantized (F32, by llama.cpp's
rules). The published "dynamic" R1 files of these types are 131 GB (IQ1_S), 158 GB (IQ1_M), 183 GB (IQ2_XXS) and
212 GB (Q2_K_XL); ``dsconvert gguf --recipe NAME --dry-run`` prints what ours come to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError

# The non-expert part every recipe shares: the shared experts and the dense FFN at Q6_K, attention at Q4_K or
# higher (attn_k_b / attn_v_b fall back by shape, as llama.cpp does).
_SHARED_HIGH = ("ffn_(gate|up|down)_shexp=q6_k", r"\.ffn_(gate|up|down)\.weight=q6_k")


@dataclass(frozen=True)
class GGUFRecipe:
    """One named recipe.

    Attributes:
        name: the ``--recipe`` value.
        type: the llama-quantize file type of the rest (``Q4_K_M``, ``IQ1_S``, ...).
        tensor_types: ``PATTERN=TYPE`` rules (lower-case regex on GGUF names, first match wins).
        summary: one line for ``--help`` and the report.
    """

    name: str
    type: str
    tensor_types: tuple[str, ...]
    summary: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensor_types"] = list(self.tensor_types)
        return d


def _experts(gate_up: str, down: str, attn: str) -> tuple[str, ...]:
    return (f"ffn_(gate|up)_exps={gate_up}", f"ffn_down_exps={down}", *_SHARED_HIGH, f"attn_={attn}",
            r"^token_embd\.weight=q4_k", r"^output\.weight=q6_k")


RECIPES: dict[str, GGUFRecipe] = {r.name: r for r in (
    GGUFRecipe("deepseek-IQ1_S", "IQ1_S", _experts("iq1_s", "iq2_xxs", "q4_k"),
               "routed experts IQ1_S, ffn_down_exps IQ2_XXS; attention Q4_K; shared/dense FFN Q6_K (needs --imatrix)"),
    GGUFRecipe("deepseek-IQ1_M", "IQ1_M", _experts("iq1_m", "iq2_xxs", "q4_k"),
               "routed experts IQ1_M, ffn_down_exps IQ2_XXS; attention Q4_K; shared/dense FFN Q6_K (needs --imatrix)"),
    GGUFRecipe("deepseek-IQ2_XXS", "IQ2_XXS", _experts("iq2_xxs", "iq2_xs", "q4_k"),
               "routed experts IQ2_XXS, ffn_down_exps IQ2_XS; attention Q4_K; shared/dense FFN Q6_K "
               "(needs --imatrix)"),
    GGUFRecipe("deepseek-Q2_K_XL", "Q2_K", _experts("q2_k", "q3_k", "q6_k"),
               "routed experts Q2_K, ffn_down_exps Q3_K; attention and shared/dense FFN Q6_K"),
)}


def get_recipe(name: str) -> GGUFRecipe:
    """The recipe called ``name`` (case-insensitive).

    Raises:
        UsageError (exit 2): no such recipe; the message lists them.
    """
    for n, r in RECIPES.items():
        if n.lower() == name.lower():
            return r
    raise UsageError(f"unknown --recipe {name!r}", hint="choices: " + ", ".join(RECIPES))


def read_tensor_type_file(path: Path) -> list[str]:
    """The ``PATTERN=TYPE`` rules of a ``--tensor-type-file``, in file order.

    The format is llama-quantize's: rules separated by whitespace (usually one per line). As an extension, ``#``
    starts a comment that runs to the end of the line (llama-quantize would reject such a file).

    Raises:
        UsageError (exit 2): the file cannot be read, or a rule has no ``=`` (names the file and line).
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--tensor-type-file {path}: {e}") from None
    rules = []
    for i, line in enumerate(text.splitlines(), 1):
        for tok in line.split("#", 1)[0].split():
            if "=" not in tok:
                raise UsageError(f"--tensor-type-file {path}, line {i}: malformed rule {tok!r}",
                                 hint="one PATTERN=TYPE per line, e.g. 'ffn_down_exps=q3_k'")
            rules.append(tok)
    return rules

"""``dsconvert logits`` and ``dsconvert validate``: run the reference forward on checkpoints and compare them.

Both models run layer-major over all sequences (every sequence through layer ``i`` before layer ``i+1`` is
read), so each checkpoint is read once whatever the number of prompts, and only one decoder layer's weights
(plus the experts its tokens reach) are resident. Metrics use llama-perplexity's names
(``Mean KLD``, ``Maximum KLD``, ``99.9% KLD``, ``Same top p``, ``RMS Δp``, PPL); see
:mod:`dsconvert.model.metrics`.

Default thresholds: ``max_kld`` 0.01 (Mean KLD) and ``min_top1`` 0.97 (Same top p) — the values
docs/cli-conventions.md uses for a near-lossless conversion; a BF16 conversion of an FP8
release gives 0 and 1 exactly. INT4 candidates usually need looser, explicit thresholds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError, UsageError
from ..model.registry import architecture, reference_model
from ..model.metrics import compare_logits, layer_errors
from ..report import base_report, peak_rss_bytes
from ..units import bytes_fields
from .calib_data import BUNDLED_TEXT, tokenize
from .progress import ByteProgress
from .weights import LayerCachedSource  # noqa: F401  (re-export)
from .weights import compute_dtype as _dtype
from .weights import CheckpointWeightSource



@dataclass
class ValidateOptions:
    token_ids: list[int] | None = None
    prompts: Path | None = None  # text file; default: the bundled validation text
    seq_len: int = 128  # tokens per sequence cut from the text
    num_samples: int = 16  # sequences: the whole bundled text (~1.9k tokens with a 512-entry BPE; README noise floor)
    max_kld: float = 0.01
    min_top1: float = 0.97
    dtype: str = "float32"
    emulate_activations: bool = True  # quantize-dequantize Linear inputs the candidate declares (docs/int-formats.md §13)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto: where the forward computes (weights are read on the CPU)
    max_memory: int | None = None  # bytes; refuse (exit 2) when the estimated peak RAM is above it


def sequences(model_dir: Path, opts: ValidateOptions, vocab_size: int) -> list[list[int]]:
    """The token sequences to evaluate: ``--token-ids`` as one sequence, else text cut into
    ``num_samples`` pieces of ``seq_len`` tokens.

    Raises:
        UsageError: ids outside the vocabulary or fewer than 2 tokens.
    """
    if opts.token_ids:
        seqs = [list(opts.token_ids)]
    else:
        path = opts.prompts or BUNDLED_TEXT
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--prompts {path}: {e.strerror}") from e
        ids = tokenize(model_dir, text)
        seqs = [ids[i: i + opts.seq_len] for i in range(0, len(ids), opts.seq_len)][: opts.num_samples]
        seqs = [s for s in seqs if len(s) >= 2]
    if not seqs or any(len(s) < 2 for s in seqs):
        raise UsageError("need at least 2 tokens to score", hint="pass more --token-ids or a longer --prompts file")
    bad = [t for s in seqs for t in s if not 0 <= t < vocab_size]
    if bad:
        raise UsageError(f"token id {bad[0]} is outside the vocabulary 0..{vocab_size - 1}")
    return seqs


def weight_source(path: Path):
    """The weight source for a candidate: a ``.gguf`` file (or split set) or a checkpoint directory."""
    if str(path).endswith(".gguf"):
        from .gguf_source import GGUFWeightSource

        return GGUFWeightSource(path)
    return CheckpointWeightSource(path)


def activation_hook(source) -> tuple[object | None, dict | None]:
    """The Linear input hook that emulates the candidate's declared activation quantization, and its summary.

    Reads ``quantization_config.config_groups`` of a compressed-tensors candidate: a Linear whose group (by
    vLLM's target rule, ignore list first) has ``input_activations`` gets its input quantize-dequantized by
    :func:`dsconvert.quant.act_quant.activation_quantizer` (NVFP4 with the module's stored
    ``input_global_scale``). Returns ``(None, None)`` when nothing is declared (weight-only schemes, GGUF,
    BF16, DeepSeek's native FP8, which the reference itself shares).

    Raises:
        UnsupportedError: declared activation args that are not emulated.
    """
    from ..formats.ct_groups import group_of
    from ..quant.act_quant import activation_quantizer, describe_activation

    qc = (getattr(source, "config", None) or {}).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return None, None
    groups = {k: g for k, g in (qc.get("config_groups") or {}).items() if (g or {}).get("input_activations")}
    if not groups:
        return None, None
    for g in groups.values():
        activation_quantizer(g["input_activations"])  # refuse unknown args up front
    fns: dict[str, object] = {}
    params: dict[str, dict] = {}
    seen: set[str] = set()

    def hook(name: str, x: torch.Tensor):
        if name not in fns:
            g = group_of(qc, name)
            fns[name] = activation_quantizer(g.get("input_activations")) if g else None
            sname = name + ".input_global_scale"
            params[name] = {"input_global_scale": source.get_raw(sname)} if source.has_raw(sname) else {}
        fn = fns[name]
        if fn is None:
            return None
        seen.add(name)
        return fn(x, params[name])

    summary = {"groups": {k: {"targets": g.get("targets"), "input_activations": describe_activation(
        g["input_activations"])} for k, g in groups.items()}, "modules_emulated": seen}
    return hook, summary


def forward_many(source, seqs: list[list[int]], dtype: torch.dtype, *, return_hidden: bool,
                 progress: ByteProgress | None = None, label: str = "", on_linear=None,
                 device: torch.device | None = None) -> tuple[list[torch.Tensor], list[list]]:
    """Layer-major forward of several sequences: returns (logits per sequence, hidden states per layer per seq),
    on the CPU whatever ``device`` computed them.

    ``on_linear`` is the reference forward's Linear input hook (it may replace a Linear's input)."""
    model = reference_model(LayerCachedSource(source), dtype=dtype, device=device)
    n = model.cfg.num_hidden_layers
    ids = [torch.tensor(s, dtype=torch.long) for s in seqs]
    pos = [torch.arange(len(s)) for s in seqs]
    with torch.no_grad():
        hs = [model.embed(i) for i in ids]
        hidden: list[list[torch.Tensor]] = []
        for layer in range(n):
            if progress is not None:
                progress.describe(f"{label} layer ({layer + 1}/{n})")
            hs = model.layer_forward_many(layer, hs, pos, on_linear, token_ids=ids)
            if return_hidden:
                hidden.append([h.to("cpu", torch.float32, copy=True) for h in hs])
            if progress is not None:
                progress.advance(1)
        logits = [model.head(h) for h in hs]
    return logits, hidden


def _estimate(paths_configs: list[tuple[Path, dict]], config: dict, seq_lens: list[int], dtype: torch.dtype,
              device: torch.device, validate: bool) -> dict:
    from .forward_plan import estimate_forward, model_cost

    return estimate_forward([model_cost(c, p) for p, c in paths_configs], config, seq_lens,
                            torch.empty((), dtype=dtype).element_size(), validate=validate,
                            on_gpu=device.type == "cuda")


def _check_memory(plan: dict, max_memory: int | None) -> None:
    from .pipeline import check_max_memory

    check_max_memory(plan["peak_memory_estimate"]["bytes"], max_memory,
                     hint="the forward holds one decoder layer, the embedding or lm_head, activations and (validate) "
                          "every layer's hidden states: fewer --num-samples / a shorter --seq-len, --dtype "
                          "bfloat16, or raise --max-memory")


def run_logits(src: Path, token_ids: list[int] | None, text: str | None, dtype: str, out: Path | None,
               overwrite: bool = False, *, device: str = "cpu", max_memory: int | None = None,
               dry_run: bool = False) -> dict:
    """``dsconvert logits``: float32 ``[tokens, vocab]`` logits of the reference forward, saved as .npy.
    ``src`` is a checkpoint directory or a ``.gguf`` file (or the first file of a split set). ``dry_run`` returns
    the plan (:mod:`.forward_plan`: peak memory, bytes read, tokens x active parameters, FLOPs) without running.

    Raises:
        OutputExistsError (exit 2): ``out`` exists and ``overwrite`` is not set (checked before the forward).
        UsageError (exit 2): ids and text both or neither given, ids outside the vocabulary, an estimated peak
            above ``max_memory``, a CUDA device that is not there.
    """
    from ..errors import OutputExistsError
    from .fp8_to_bf16 import resolve_device
    from .manifest import write_atomic

    t0 = time.perf_counter()
    if out is not None and Path(out).exists() and not overwrite:
        raise OutputExistsError(f"-o {out}: the file exists", hint="add --overwrite to replace it, or choose another -o")
    if (token_ids is None) == (text is None):
        raise UsageError("give exactly one of --token-ids and --text")
    if text is not None and str(src).endswith(".gguf"):
        raise UsageError("--text needs the checkpoint's tokenizer.json; for a GGUF file pass --token-ids")
    dev = resolve_device(device)
    source = weight_source(Path(src))
    ids = token_ids if token_ids is not None else tokenize(Path(src), text)
    vocab = int(source.config["vocab_size"])
    if not ids or any(not 0 <= t < vocab for t in ids):
        raise UsageError(f"token ids must be non-empty and inside 0..{vocab - 1}")
    plan = _estimate([(Path(src), source.config)], source.config, [len(ids)], _dtype(dtype), dev, validate=False)
    _check_memory(plan, max_memory)
    rep = base_report("logits")
    rep.update({"source": str(src), "tokens": len(ids), "token_ids": ids, "dtype": dtype, "device": str(dev),
                "dry_run": dry_run, "plan": plan})
    if dry_run:
        rep["output"] = str(out) if out else None
        return rep
    logits, _ = forward_many(source, [ids], _dtype(dtype), return_hidden=False, device=dev)
    arr = logits[0].float().numpy()
    if out is not None:
        import io

        out.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, arr)
        write_atomic(out, buf.getvalue())
    rep.update({"shape": list(arr.shape), "output": str(out) if out else None,
                "top1": arr.argmax(-1).tolist(), "seconds": round(time.perf_counter() - t0, 3),
                "peak_rss": bytes_fields(peak_rss_bytes())})
    return rep


def check_thresholds(opts: "ValidateOptions") -> None:
    """Refuse thresholds that cannot mean what the user wants, before any forward pass.

    Raises:
        UsageError (exit 2): ``max_kld`` negative or not finite (a KLD is >= 0, so a negative bound fails a
            perfect conversion); ``min_top1`` outside [0, 1] (a fraction, not a percentage).
    """
    import math

    from ..errors import UsageError

    if not (math.isfinite(opts.max_kld) and opts.max_kld >= 0):
        raise UsageError(f"--max-kld {opts.max_kld}: a Mean KLD bound must be a finite number >= 0",
                         hint="e.g. --max-kld 0.01 for a near-lossless conversion, 0.5 for a 4-bit one")
    if not (0.0 <= opts.min_top1 <= 1.0):
        raise UsageError(f"--min-top1 {opts.min_top1}: Same top p is a fraction in [0, 1]",
                         hint="e.g. --min-top1 0.97 (97 %), not 97")


def failed_checks(mean_kld: float, same_top_p: float, nonfinite: bool, opts: "ValidateOptions") -> list[dict]:
    """The checks a validation failed, each ``{"check", "value", "threshold", "message"}``, in a fixed order
    (non-finite logits, Mean KLD, Same top p); empty when it passed."""
    out = []
    if nonfinite:
        out.append({"check": "finite_logits", "value": False, "threshold": True,
                    "message": "non-finite logits (NaN or inf) in the reference or the candidate"})
    if not mean_kld <= opts.max_kld:
        out.append({"check": "mean_kld", "value": mean_kld, "threshold": opts.max_kld,
                    "message": f"Mean KLD {mean_kld:.4g} > --max-kld {opts.max_kld:g} "
                               f"(over by {mean_kld - opts.max_kld:.4g})"})
    if not same_top_p >= opts.min_top1:
        out.append({"check": "same_top_p", "value": same_top_p, "threshold": opts.min_top1,
                    "message": f"Same top p {100 * same_top_p:.2f}% < --min-top1 {100 * opts.min_top1:.2f}% "
                               f"(short by {100 * (opts.min_top1 - same_top_p):.2f} points)"})
    return out


def _tokenizer_checks(model_dir: Path, role: str, config: dict, opts: ValidateOptions) -> list[dict]:
    """The ``tokenizer`` check of one checkpoint folder: ``tokenizer.json`` against config.json (ids inside
    ``vocab_size``, bos/eos at config.json's ids; docs/checkpoint-layout.md §15), then a smoke test: the text
    validate would score is tokenized and every id must be inside the vocabulary."""
    from ..formats.tokenizer_check import tokenizer_problems

    out = []
    for p in tokenizer_problems(model_dir, config):
        if p.kind == "tokenizer_missing":
            continue  # needed only for text: tokenize() refuses then, with its own message (exit 3)
        out.append({"check": "tokenizer", "value": p.kind, "threshold": None,
                    "message": f"{role} {model_dir}: {p.message}", "hint": p.hint})
    if out or opts.token_ids or not (model_dir / "tokenizer.json").is_file():
        return out
    try:
        text = Path(opts.prompts or BUNDLED_TEXT).read_text(encoding="utf-8")[:4000]
    except OSError:
        return out  # sequences() reports an unreadable --prompts file
    vocab = int(config.get("vocab_size") or 0)
    ids = tokenize(model_dir, text)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        out.append({"check": "tokenizer", "value": "tokenization_smoke_test", "threshold": None,
                    "message": f"{role} {model_dir}: tokenizing the validation text gives {len(bad)} ids outside "
                               f"the vocabulary 0..{vocab - 1} (first {bad[0]})",
                    "hint": "use the tokenizer.json released with this checkpoint"})
    return out


def _loadability_checks(candidate: Path) -> list[dict]:
    """Structure a serving engine needs, from headers only: an INT checkpoint must not split a fused group
    ({q_a_proj, kv_a_proj_with_mqa}, {gate_proj, up_proj}, a layer's experts) across precisions: vLLM and SGLang
    load each group as one fused layer and refuse the mix (docs/int-formats.md)."""
    if not Path(candidate).is_dir():
        return []
    from ..formats.checkpoint import scan
    from ..formats.registry import detect_format
    from .inspect import _int_summary

    ck = scan(candidate)
    qc = ck.config.get("quantization_config") or {}
    fmt = detect_format(qc) if qc and qc.get("quant_method") != "fp8" else None
    if fmt is None:
        return []
    if hasattr(fmt, "inspect_summary"):  # per-config-group checkpoints (FP4, mixed recipes)
        _, probs, _, _ = fmt.from_config(qc).inspect_summary(ck)
    elif hasattr(fmt, "spec_from_config"):
        _, probs, _, _ = _int_summary(ck, fmt)
    else:
        return []
    return [{"check": p["kind"], "value": False, "threshold": True, "message": f"candidate {candidate}: "
             + p["message"], "hint": p.get("hint")} for p in probs if p["kind"] == "fused_group_split"]


def pre_checks(candidate: Path, reference: Path, cand_config: dict, ref_config: dict,
               opts: ValidateOptions) -> list[dict]:
    """The checks validate runs before any forward pass, each a failed-check dict like :func:`failed_checks`:
    ``tokenizer`` (reference and candidate folders) and ``fused_group_split`` (an INT candidate). Any failure
    fails the validation (exit 4) without running the forward pass."""
    out = _tokenizer_checks(Path(reference), "reference", ref_config, opts)
    if Path(candidate).is_dir() and Path(candidate).resolve() != Path(reference).resolve():
        out += _tokenizer_checks(Path(candidate), "candidate", cand_config, opts)
    return out + _loadability_checks(Path(candidate))


def run_validate(candidate: Path, reference: Path, opts: ValidateOptions, *, progress: bool | None = None,
                 dry_run: bool = False) -> dict:
    """Compare ``candidate`` against ``reference`` through the reference forward; returns the report with
    ``passed`` set. The caller maps ``passed == False`` to exit code 4. ``dry_run`` returns the plan instead
    (:mod:`.forward_plan`: peak memory, bytes read, tokens x active parameters, FLOPs; with the pre-checks'
    findings) and runs nothing.

    ``failed_checks`` names each failed threshold and by how much.

    Raises:
        UsageError: thresholds out of range (:func:`check_thresholds`), an estimated peak above
            ``opts.max_memory``, a CUDA device that is not there.
        BadInputError: either checkpoint is unreadable, or they disagree on vocabulary / layer count.
    """
    t0 = time.perf_counter()
    from .fp8_to_bf16 import resolve_device

    check_thresholds(opts)
    dtype = _dtype(opts.dtype)
    dev = resolve_device(opts.device)
    ref_src = CheckpointWeightSource(reference)
    cand_src = weight_source(candidate)
    rc, cc = ref_src.config, cand_src.config
    for key in ("vocab_size", "num_hidden_layers", "hidden_size"):
        if rc.get(key) != cc.get(key):
            raise BadInputError(f"{candidate}: config {key} {cc.get(key)} differs from the reference's {rc.get(key)}",
                                hint="validate a conversion against its own source")
    rep = base_report("validate")
    rep.update({"candidate": str(candidate), "reference": str(reference),
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
                "thresholds": {"max_kld": opts.max_kld, "min_top1": opts.min_top1}})
    pre = pre_checks(Path(candidate), Path(reference), cc, rc, opts)
    if pre and not dry_run:  # the forward pass (hours on the release) would measure a checkpoint unusable as is
        rep.update({"passed": False, "failed_checks": pre, "forward": "skipped: a pre-check failed",
                    "seconds": round(time.perf_counter() - t0, 3), "peak_rss": peak_rss_bytes()})
        return rep
    if pre:  # a dry run still plans, with the nominal sequence lengths (the tokenizer is what failed)
        seqs = [list(opts.token_ids)] if opts.token_ids else [[0] * opts.seq_len] * opts.num_samples
    else:
        seqs = sequences(Path(reference), opts, int(rc["vocab_size"]))
    plan = _estimate([(Path(reference), rc), (Path(candidate), cc)], rc, [len(s) for s in seqs], dtype, dev,
                     validate=True)
    _check_memory(plan, opts.max_memory)
    rep["plan"] = plan
    rep["device"] = str(dev)
    if dry_run:
        rep.update({"dry_run": True, "pre_checks_failed": pre})
        return rep
    n_layers = int(rc["num_hidden_layers"])
    with ByteProgress(2 * n_layers, "validate", enabled=progress, unit="layers") as bar:
        ref_logits, ref_hidden = forward_many(ref_src, seqs, dtype, return_hidden=True, progress=bar,
                                              label="reference", device=dev)
        hook, emulation = activation_hook(cand_src) if opts.emulate_activations else (None, None)
        cand_logits, cand_hidden = forward_many(cand_src, seqs, dtype, return_hidden=True, progress=bar,
                                                label="candidate", on_linear=hook, device=dev)
    overlap = calibration_overlap(Path(candidate), seqs)
    metrics = _pool(ref_logits, cand_logits, seqs)
    layers = []
    for i in range(n_layers):
        errs = layer_errors([torch.cat(ref_hidden[i])], [torch.cat(cand_hidden[i])])[0]
        errs["layer"] = i
        layers.append(errs)
    first_div, largest_jump = _localize([r["rel_error"] for r in layers])
    nonfinite = not (metrics["cand_nonfinite"]["ok"] and metrics["ref_nonfinite"]["ok"])
    failed = failed_checks(metrics["mean_kld"], metrics["same_top_p"], nonfinite, opts)
    passed = not failed
    rep.update({
        "forward": "run",
        "sequences": len(seqs), "tokens": sum(len(s) for s in seqs),
        **{k: metrics[k] for k in ("mean_kld", "max_kld", "p999_kld", "p99_kld", "median_kld", "same_top_p",
                                   "rms_dp", "ppl_reference", "ppl_candidate", "ln_ppl_ratio", "n_positions")},
        "nonfinite": {"reference": metrics["ref_nonfinite"], "candidate": metrics["cand_nonfinite"]},
        "layers": layers,
        "first_diverging_layer": first_div,
        "largest_error_jump_layer": largest_jump,
        "activation_emulation": ({**emulation, "modules_emulated": len(emulation["modules_emulated"])}
                                 if emulation else None),
        "thresholds": {"max_kld": opts.max_kld, "min_top1": opts.min_top1},
        **overlap,
        "passed": passed,
        "failed_checks": failed,
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss": peak_rss_bytes(),
    })
    if nonfinite:
        rep["advice"] = ("non-finite logits: if the candidate was computed in float16, overflow is likely; "
                         "use bfloat16 activations")
    return rep


def calibration_overlap(candidate: Path, seqs: list[list[int]]) -> dict:
    """Whether the evaluation windows ``seqs`` overlap the candidate's calibration windows, from the
    ``calibration.json`` that ``quantize --awq/--gptq`` writes (:mod:`dsconvert.convert.calibration_data`).

    Returns ``{}`` for a candidate without one (RTN, BF16, GGUF, another tool's output), else
    ``{"calibration": {dataset, windows_sha256, ...}, "calibration_overlap": bool,
    "calibration_overlap_windows": n}`` plus ``"warnings"`` when ``n > 0``: metrics measured on text the
    quantizer was fitted to are in-sample and flatter the calibrated method.

    Raises:
        BadInputError: ``calibration.json`` is not valid JSON.
    """
    from .calibration_data import SIDECAR, overlapping_windows

    path = candidate / SIDECAR
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: unreadable calibration record ({e})",
                            hint=f"remove {SIDECAR} to validate without the overlap check") from e
    n = overlapping_windows(seqs, doc)
    out = {"calibration": {k: v for k, v in doc.items() if k not in ("hashes", "ngram", "stride")},
           "calibration_overlap": n > 0, "calibration_overlap_windows": n}
    if n:
        out["warnings"] = [f"{n} of {len(seqs)} evaluation windows overlap the candidate's calibration data "
                           f"({doc.get('dataset')}): these metrics are in-sample; evaluate on other text "
                           "(--prompts) or calibrate on other text (--calib-data)"]
    return out


def _localize(rel: list[float]) -> tuple[int | None, int | None]:
    """(first diverging layer, layer of the largest error increase) from per-layer relative errors.

    The first diverging layer is the first whose hidden states differ at all (``rel_error != 0``, NaN/inf
    included): exact for a lossless candidate, where every earlier layer is bit-identical; for a lossy one it is
    0 and the largest jump is the useful figure. A fault whose own effect is damped (a scaled ``q_a_proj`` is
    mostly undone by ``q_a_layernorm``) can make a *later* layer's jump the largest, hence both. A non-finite
    error counts as an infinite jump at the first layer that has one (NaN would otherwise never be the max).
    """
    if not rel:
        return None, None
    first = next((i for i, r in enumerate(rel) if r != 0), None)  # NaN != 0 is True
    bad = next((i for i, r in enumerate(rel) if not np.isfinite(r)), None)
    if bad is not None:
        return first, bad
    jumps = [rel[0]] + [rel[i] - rel[i - 1] for i in range(1, len(rel))]
    return first, (int(np.argmax(jumps)) if max(jumps) > 0 else None)


def _pool(ref_logits, cand_logits, seqs) -> dict:
    """Metrics over all scored positions of all sequences (KLD percentiles need the raw per-position values)."""
    if len(seqs) == 1:
        return compare_logits(ref_logits[0], cand_logits[0], torch.tensor(seqs[0]))
    lp_r = torch.cat([r[:-1].double().log_softmax(-1) for r in ref_logits])
    lp_c = torch.cat([c[:-1].double().log_softmax(-1) for c in cand_logits])
    nxt = torch.cat([torch.tensor(s[1:]) for s in seqs])[:, None]
    # Rebuild the pooled tensors as one pseudo-sequence: compare_logits scores rows 0..N-2 against ids[1:],
    # so append a dummy last row and shift the ids by one.
    ids = torch.cat([torch.zeros(1, dtype=torch.long), nxt[:, 0]])
    pad = torch.zeros(1, lp_r.shape[1], dtype=lp_r.dtype)
    return compare_logits(torch.cat([lp_r, pad]), torch.cat([lp_c, pad]), ids)

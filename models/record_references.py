#!/usr/bin/env python3
"""Record PEFT / training reference data for graft's tests under models/references/.

The base models are rebuilt with models/generate.py's own recording builders
(same seeded init + seeded parameter perturbation), so they carry exactly the
weights of the committed ONNX fixtures; this is checked first: the rebuilt torch
model must reproduce every committed fixtures/<arch>-<exporter>/outputs.npz.

Recordings (each into models/references/<name>/):

  peft-bert, peft-llama, peft-gpt2   HF PEFT LoRA adapters with non-zero B
      adapter_config.json, adapter_model.safetensors   (PeftModel.save_pretrained)
      outputs.npz          PeftModel outputs (unmerged) on fixtures/<arch>-legacy/inputs.npz
      merged_outputs.npz   the same after merge_and_unload()

  peft-prompt-bert, peft-prompt-gpt2, peft-prompt-llama   HF PEFT prompt tuning
      PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="RANDOM"), task_type
      SEQ_CLS (bert, + perturbed classifier in modules_to_save) / CAUSAL_LM (gpt2, llama);
      prompt = PEFT's own N(0, 1) init under torch.manual_seed, not rescaled
      adapter_config.json, adapter_model.safetensors   (key prompt_embeddings [4, hidden])
      outputs.npz          PeftModel outputs on fixtures/<arch>-legacy/inputs.npz, as PEFT
                           returns them (bert [B, 2]; gpt2/llama [B, 4+S, V], virtual first)

  peft-prefix-gpt2, peft-prefix-llama   HF PEFT prefix tuning
      PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=False)
      on base_recording(arch) (= the <arch>-past fixtures' weights, checked); table <- seeded N(0, 0.5^2)
      adapter_config.json, adapter_model.safetensors   (key prompt_embeddings [4, L*2*token_dim];
                           token_dim = kv_heads * head_dim: gpt2 32, llama 16)
      inputs.npz           fixtures/<arch>-past-legacy input_ids and attention_mask[:, P:] (no past)
      outputs.npz          PeftModel logits [B, S, V] on inputs.npz
      (table -> per-layer past mapping, mask / position / label treatment: PREFIX_TREATMENT)

  prefix-bert, prefix-roberta   HF PEFT prefix tuning on the encoders (SEQ_CLS)
      PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prefix_projection=False) on
      base_recording(arch); table <- seeded N(0, 0.5^2); classifier (modules_to_save) perturbed
      adapter_config.json, adapter_model.safetensors   (prompt_embeddings [4, L*2*hidden] + base_model.classifier.*)
      inputs.npz           fixtures/<arch>-legacy/inputs.npz (the ONNX-named feeds)
      outputs.npz          logits [B, 2] from TRANSFORMERS, not PEFT: PEFT 0.21.2's SEQ_CLS prefix forward
                           refuses under transformers 5.24 ("Model does not support past key values ...");
                           the plain HF model with the saved classifier, cache = the table's past, mask with
                           n ones prepended (ENCODER_PREFIX_TREATMENT; checked against PEFT's own forward
                           run through a signature shim)

  train-bert, train-llama            20 AdamW steps of LoRA training
      data.jsonl           pre-tokenized, already padded examples; batch k = lines
                           [k*B, (k+1)*B) (mod the dataset), no shuffling
      initial_adapter/     PEFT save of the adapter before step 1
      final_adapter/       PEFT save of the adapter after step 20
      losses.json          the 20 per-step losses (computed before each optimizer step)
      recipe.json          every hyperparameter of the run

  adalora-bert, adalora-llama        24 AdamW steps of HF PEFT AdaLoRA training
      data.jsonl           the same lines as train-<arch>/data.jsonl
      initial_adapter/     PEFT save before step 1 (full rank init_r, rank_pattern null)
      final_adapter/       PEFT save after step 24 (tensors truncated to the final rank_pattern,
                           which adapter_config.json holds)
      final_full.safetensors  every lora_A/lora_B/lora_E after step 24, full rank, masked E = 0
      losses.json          {"loss", "task_loss", "orth_reg"}: 24 values each
      schedule.json        per step: budget, whether/how E was masked, kept ranks (+ scores)
      outputs_final.npz, merged_outputs_final.npz   trained model on fixtures/<arch>-legacy/inputs.npz
      recipe.json          config, forward/regularizer/importance/budget/masking rules, order

  manifest.json            check figures (fixture rebuild, unmerged vs merged,
                           ORT fixture vs torch on the training batches), sizes, versions

Usage (from the repository root):
  python models/record_references.py            # everything
  python models/record_references.py --only train-llama --out /tmp/refs
  python models/record_references.py --only adalora-bert,adalora-llama
  python models/record_references.py --only peft-prefix-gpt2,peft-prefix-llama
  python models/record_references.py --only prefix-bert,prefix-roberta
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

# PEFT turns target_modules into a set and writes it back as a list: its order in
# adapter_config.json follows Python's string hashing.  Fix the hash seed so that the
# files are reproducible byte for byte.
if os.environ.get("PYTHONHASHSEED") != "0" and __name__ == "__main__":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.dont_write_bytecode = True  # no models/__pycache__ from importing generate.py
sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate as G  # noqa: E402  (sets HF_HUB_OFFLINE etc. before importing transformers)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from peft.tuners.adalora import AdaLoraLayer  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

MODELS_DIR = G.MODELS_DIR
FIXTURES_DIR = G.FIXTURES_DIR
REFS_DIR = MODELS_DIR / "references"

REF_SEED = 4321  # seeds of everything this script draws (LoRA init, B, data)
FIXTURE_TOL = 1e-6  # rebuilt torch model vs committed outputs.npz
MERGE_TOL = 1e-5  # PEFT unmerged vs merged outputs
ORT_TOL = 1e-5  # fixture ONNX (onnxruntime) vs torch on the training batches
MAX_REFS_BYTES = 1_500_000

PAD_ID = 0  # pad_token_id of the bert and llama fixture configs
BOS_ID = 1  # bos_token_id of the llama fixture config
IGNORE_INDEX = -100


def gen(*parts) -> torch.Generator:
    h = hashlib.sha256(repr((REF_SEED,) + parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def seed_of(*parts) -> int:
    h = hashlib.sha256(repr((REF_SEED,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------
# Base models (from generate.py) and the fixture check
# --------------------------------------------------------------------------------------


def base_recording(arch: str) -> G.Recording:
    """generate.py's recording: seeded init + seeded perturbation, eval(), unpatched forward."""
    rec = G.REGISTRY[arch]()
    G.check_labels(rec.model, rec.labels)
    return rec


def fixture_arrays(arch: str, exporter: str, what: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES_DIR / f"{arch}-{exporter}" / f"{what}.npz") as z:
        return {k: z[k] for k in z.files}


def run_outputs(rec: G.Recording, forward, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """rec.run with `forward` (HF model, PeftModel, merged model) on ONNX-named feeds."""
    kwargs = {t.arg: torch.from_numpy(feeds[t.onnx_name]) for t in rec.inputs}
    with torch.no_grad():
        outs = rec.run(forward, **kwargs)
    return {t.onnx_name: o.detach().numpy() for t, o in zip(rec.outputs, outs)}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def check_fixture_rebuild(arch: str) -> dict:
    """The rebuilt torch model must reproduce both committed fixtures' outputs.npz."""
    res = {}
    rec = base_recording(arch)
    for exporter in G.EXPORTERS:
        feeds = fixture_arrays(arch, exporter, "inputs")
        want = fixture_arrays(arch, exporter, "outputs")
        got = run_outputs(rec, rec.model, feeds)
        d = max_diff(got, want)
        exact = all(np.array_equal(got[k], want[k]) for k in want)
        if d > FIXTURE_TOL:
            raise AssertionError(f"{arch}-{exporter}: rebuilt torch model differs from outputs.npz by {d:.3g}")
        res[exporter] = {"max_abs_diff": d, "bit_identical": exact}
    a, b = fixture_arrays(arch, "legacy", "inputs"), fixture_arrays(arch, "dynamo", "inputs")
    res["legacy_and_dynamo_inputs_identical"] = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return res


# --------------------------------------------------------------------------------------
# PEFT helpers
# --------------------------------------------------------------------------------------


def lora_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    return sorted(((n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n), key=lambda x: x[0])


@torch.no_grad()
def overwrite_lora_B(model, std: float, g: torch.Generator) -> None:
    """Every lora_B <- randn * std, in sorted parameter-name order."""
    for n, p in lora_params(model):
        if ".lora_B." in n:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def save_adapter(model, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out_dir))
    card = out_dir / "README.md"  # PEFT's auto-generated model card: boilerplate, not needed
    if card.exists():
        card.unlink()
    got = sorted(p.name for p in out_dir.iterdir())
    if got != ["adapter_config.json", "adapter_model.safetensors"]:
        raise AssertionError(f"{out_dir}: unexpected files {got}")


def safetensors_summary(path: Path) -> dict:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}


def check_saved_adapter(model, out_dir: Path) -> None:
    """Saved tensors equal the live LoRA parameters (and load back into PEFT's names)."""
    saved = safetensors.torch.load_file(str(out_dir / "adapter_model.safetensors"))
    live = {n.replace(".default", ""): p.detach() for n, p in lora_params(model)}
    for n, t in live.items():
        if n not in saved:
            raise AssertionError(f"{out_dir}: {n} not saved; saved keys {sorted(saved)[:4]}...")
        if not torch.equal(saved[n], t):
            raise AssertionError(f"{out_dir}: {n} differs from the live parameter")


# --------------------------------------------------------------------------------------
# 1. PEFT adapters + outputs
# --------------------------------------------------------------------------------------

PEFT_CONFIGS = {
    "bert": dict(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        lora_dropout=0.0,
    ),
    "llama": dict(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 4},
    ),
    "gpt2": dict(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        layers_to_transform=[1],
    ),
}
B_STD_PEFT = 0.1
MODULES_TO_SAVE_NOISE = 0.1


@torch.no_grad()
def perturb_modules_to_save(model, g: torch.Generator) -> list[str]:
    """Every parameter of PEFT's trainable modules_to_save copies += randn * MODULES_TO_SAVE_NOISE,
    in sorted parameter-name order; returns the perturbed names."""
    mts = []
    for n, p in sorted(model.named_parameters()):
        if ".modules_to_save.default." in n:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * MODULES_TO_SAVE_NOISE)
            mts.append(n)
    return mts


def record_peft(arch: str, out_dir: Path) -> dict:
    rec = base_recording(arch)
    feeds = fixture_arrays(arch, "legacy", "inputs")
    base_out = run_outputs(rec, rec.model, feeds)

    cfg = LoraConfig(init_lora_weights="gaussian", **PEFT_CONFIGS[arch])
    torch.manual_seed(seed_of("peft", arch, "lora_A"))  # gaussian A draws from the global RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(rec.model, cfg)
    overwrite_lora_B(model, B_STD_PEFT, gen("peft", arch, "lora_B"))

    # modules_to_save (the classifier that PEFT adds for SEQ_CLS): perturb PEFT's trainable
    # copy so that the saved head differs from the base model's and importing it matters.
    mts = perturb_modules_to_save(model, gen("peft", arch, "modules_to_save"))

    scalings = {
        n.replace("base_model.model.", "", 1): {"r": m.r["default"], "lora_alpha": m.lora_alpha["default"], "scaling": m.scaling["default"]}
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_adapter(model, out_dir)
    check_saved_adapter(model, out_dir)

    model.eval()
    out = run_outputs(rec, model, feeds)
    merged = model.merge_and_unload()
    merged.eval()
    merged_out = run_outputs(rec, merged, feeds)
    d_merge = max_diff(out, merged_out)
    if d_merge > MERGE_TOL:
        raise AssertionError(f"peft-{arch}: unmerged vs merged differ by {d_merge:.3g}")
    d_base = max_diff(out, base_out)
    if d_base < 1e-3:
        raise AssertionError(f"peft-{arch}: the adapter barely changes the outputs ({d_base:.3g})")
    G.write_npz(out_dir / "outputs.npz", out)
    G.write_npz(out_dir / "merged_outputs.npz", merged_out)

    # the saved files alone reproduce the outputs: fresh base model + PeftModel.from_pretrained
    fresh = base_recording(arch)
    loaded = PeftModel.from_pretrained(fresh.model, str(out_dir))
    loaded.eval()
    d_reload = max_diff(run_outputs(fresh, loaded, feeds), out)
    if d_reload != 0.0:
        raise AssertionError(f"peft-{arch}: reloaded adapter differs from outputs.npz by {d_reload:.3g}")
    return {
        "base_fixture": f"{arch}-legacy (same weights and inputs as {arch}-dynamo)",
        "inputs": f"models/fixtures/{arch}-legacy/inputs.npz",
        "max_abs_unmerged_vs_merged": d_merge,
        "max_abs_adapter_vs_base": d_base,
        "max_abs_reloaded_vs_outputs": d_reload,
        "max_abs_output": max(float(np.max(np.abs(a))) for a in out.values()),
        "modules_to_save_params_perturbed": [n.replace(".default", "") for n in mts],
        "lora_layers": scalings,
        "tensors": safetensors_summary(out_dir / "adapter_model.safetensors"),
    }


# --------------------------------------------------------------------------------------
# 1b. PEFT prompt tuning: prompt embeddings + outputs
# --------------------------------------------------------------------------------------

PROMPT_TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}
PROMPT_VIRTUAL_TOKENS = 4

# How PEFT 0.21.2 (peft/peft_model.py) treats the inputs of a prompt-tuning forward; written
# into the manifest and checked against what actually reaches the HF model (probe_prompt_inputs).
PROMPT_INPUT_TREATMENT = {
    "common": {
        "input_ids": "not passed to the HF model: inputs_embeds = torch.cat((prompts, word_embeddings(input_ids)), dim=1) "
        "[B, n+S, hidden], prompts = the prompt embedding [n, hidden] repeated over the batch (virtual tokens FIRST); "
        "the HF model is called with inputs_embeds and treats the virtual tokens like embedded real tokens from there on "
        "(bert: + position and token-type embeddings, LayerNorm; gpt2: + wpe; llama: RoPE in attention)",
        "attention_mask": "torch.cat((torch.ones(B, n), attention_mask), dim=1): n ones prepended; torch.ones is float32, "
        "so torch.cat promotes the int64 mask and the HF model receives a float32 [B, n+S] mask of 1.0/0.0",
        "position_ids": "if given: _adjust_prompt_learning_kwargs warns 'Position ids are not supported for parameter efficient "
        "tuning. Ignoring position ids.' and sets them to None (only prefix tuning / cartridge offset them by n); the HF model "
        "then uses its default positions arange(0, n+S) over the virtual + real tokens",
        "prompt_values": "training mode: prompt_encoder(prompt_tokens[:1]) (= embedding.weight) .repeat(B, 1, 1); inference mode "
        "(PeftModel.from_pretrained): embedding.weight.repeat(B, 1, 1) (same values)",
    },
    "SEQ_CLS": {
        "class": "PeftModelForSequenceClassification.forward",
        "token_type_ids": "kept (remove_token_type_ids=False) with n zeros prepended: torch.cat((torch.zeros(B, n), token_type_ids), dim=1).long()",
        "labels": "passed through unchanged ([B] class labels, no prefix)",
        "outputs": "logits [B, num_labels]; BertPooler reads hidden_states[:, 0], which is now the FIRST VIRTUAL TOKEN (not the first input token)",
        "modules_to_save": "PEFT adds ['classifier', 'score'] to modules_to_save (trainable copy of the head, saved with the prompt)",
    },
    "CAUSAL_LM": {
        "class": "PeftModelForCausalLM.forward",
        "token_type_ids": "dropped: _adjust_prompt_learning_kwargs(remove_token_type_ids=True) warns 'Token type ids are not supported "
        "for parameter efficient tuning. Ignoring token type ids' and sets them to None",
        "labels": "if given: torch.cat((torch.full((B, n), -100), labels), dim=1) (virtual positions ignored by the loss)",
        "outputs": "logits [B, n+S, vocab] (logits_to_keep=0): positions 0..n-1 are the virtual tokens, position n+j is input token j",
        "modules_to_save": "none",
    },
}


@torch.no_grad()
def probe_prompt_inputs(rec: G.Recording, model, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict:
    """Check PROMPT_INPUT_TREATMENT against the kwargs PEFT passes to the HF model (forward pre-hook):
    call 1 is the recording's own run (rec.run); call 2 adds position_ids, labels and token_type_ids."""
    cfg = model.active_peft_config
    n, task = cfg.num_virtual_tokens, cfg.task_type
    seen = []

    def hook(_mod, args, kwargs):
        seen.append((len(args), {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}))

    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    b, s = ids.shape
    extra = {"position_ids": (torch.arange(s) + 1).expand(b, s).contiguous()}
    if task == "SEQ_CLS":
        extra["token_type_ids"] = torch.from_numpy(feeds["token_type_ids"])
        extra["labels"] = torch.arange(b) % 2
    else:
        extra["token_type_ids"] = torch.ones(b, s, dtype=torch.int64)  # would change GPT-2's embeddings if it got through
        extra["labels"] = ids.clone()
        extra["use_cache"] = False
    handle = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        plain = run_outputs(rec, model, feeds)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = model(input_ids=ids, attention_mask=mask, return_dict=True, **extra)
    finally:
        handle.remove()
    if len(seen) != 2 or any(nargs for nargs, _ in seen):
        raise AssertionError(f"expected 2 keyword-only calls of the HF model, got {[(a, sorted(k)) for a, k in seen]}")
    k1, k2 = seen[0][1], seen[1][1]

    def fail(what):
        raise AssertionError(f"prompt {task}: {what}")

    prompt = model.prompt_encoder["default"].embedding.weight
    for k in (k1, k2):
        e = k.get("inputs_embeds")
        if k.get("input_ids") is not None or e is None or tuple(e.shape) != (b, n + s, prompt.shape[1]):
            fail("input_ids not replaced by inputs_embeds [B, n+S, hidden]")
        if not torch.equal(e[:, :n], prompt.expand(b, -1, -1)) or not torch.equal(e[:, n:], model.word_embeddings(ids)):
            fail("inputs_embeds != cat(prompt, word_embeddings(input_ids))")
        want_mask = torch.cat((torch.ones(b, n), mask), dim=1)
        if k["attention_mask"].dtype != torch.float32 or not torch.equal(k["attention_mask"], want_mask):
            fail("attention_mask != cat(ones, mask) as float32")
        if k.get("position_ids") is not None:
            fail("position_ids reached the HF model")
    if task == "SEQ_CLS":
        want_tt = torch.cat((torch.zeros(b, n, dtype=torch.int64), torch.from_numpy(feeds["token_type_ids"])), dim=1)
        for k in (k1, k2):
            if k["token_type_ids"].dtype != torch.int64 or not torch.equal(k["token_type_ids"], want_tt):
                fail("token_type_ids != cat(zeros, token_type_ids)")
        if not torch.equal(k2["labels"], extra["labels"]):
            fail("labels changed")
    else:
        if k1.get("token_type_ids") is not None or k2.get("token_type_ids") is not None:
            fail("token_type_ids reached the HF model")
        if not torch.equal(k2["labels"], torch.cat((torch.full((b, n), IGNORE_INDEX), ids), dim=1)):
            fail("labels != cat(-100 * n, labels)")
    if max_diff(plain, out) != 0.0:
        fail("run not reproducible")
    d_extra = float((res.logits - torch.from_numpy(out["logits"])).abs().max())
    if d_extra != 0.0:
        fail(f"position_ids / token_type_ids / labels changed the logits by {d_extra:.3g}")
    # the HF model's default positions are arange(0, n+S): passing them explicitly gives the same logits
    explicit = {k: v for k, v in k1.items() if k not in ("labels", "output_attentions", "output_hidden_states")}
    explicit["position_ids"] = torch.arange(n + s).expand(b, n + s).contiguous()
    d_pos = float((model.get_base_model()(**explicit).logits - torch.from_numpy(out["logits"])).abs().max())
    if d_pos != 0.0:
        fail(f"HF model with explicit position_ids = arange(n+S) differs by {d_pos:.3g}")

    def desc(v):
        if torch.is_tensor(v):
            return {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        return v

    return {
        "kwargs_reaching_hf_model_on_rec_run": {k: desc(v) for k, v in sorted(k1.items())},
        "kwargs_reaching_hf_model_with_position_ids_labels_token_type_ids": {k: desc(v) for k, v in sorted(k2.items())},
        "extra_call": "model(input_ids, attention_mask, position_ids=arange(S)+1, token_type_ids="
        + ("the fixture's" if task == "SEQ_CLS" else "ones")
        + ", labels=" + ("[0, 1]" if task == "SEQ_CLS" else "input_ids")
        + "): logits identical to outputs.npz (max abs diff 0.0)",
        "explicit_positions_call": "the HF model called directly with call 1's kwargs plus position_ids = arange(n+S) gives logits "
        "identical to outputs.npz (max abs diff 0.0): its default positions cover the virtual tokens first",
        "peft_warnings": sorted({str(w.message) for w in caught if "not supported" in str(w.message)}),
        "checked": "inputs_embeds = cat(prompt, word_embeddings(input_ids)); input_ids not passed; attention_mask = cat(ones, mask) float32; "
        "position_ids None; "
        + (
            "token_type_ids = cat(zeros, token_type_ids) int64; labels unchanged"
            if task == "SEQ_CLS"
            else "token_type_ids None; labels = cat(-100 * n, labels)"
        ),
    }


def record_prompt_tuning(arch: str, out_dir: Path) -> dict:
    """HF PEFT prompt tuning: PromptTuningConfig(task_type, num_virtual_tokens=4, prompt_tuning_init="RANDOM").

    The prompt embedding is PEFT's own init: torch.manual_seed(seed_of("prompt", arch)) right
    before get_peft_model, and PromptEmbedding's torch.nn.Embedding(4, hidden) draws N(0, 1)
    from the global RNG (RANDOM = no further init).  It is NOT rescaled: the fixtures' word
    embeddings have std ~0.2, the prompt ~1, and the logits stay moderate (max |logit| <= 4.5
    against <= 3.7 for the base models), so scaling by 0.1 was not needed.  bert (SEQ_CLS): PEFT
    adds the classifier to modules_to_save; its trainable copy gets seeded randn * 0.1
    (perturb_modules_to_save, as record_peft) so that importing the saved head matters.

    Files: adapter_config.json + adapter_model.safetensors (PeftModel.save_pretrained; key
    `prompt_embeddings` [4, hidden], plus the classifier for bert) and outputs.npz = exactly what
    the PeftModel returns on fixtures/<arch>-legacy/inputs.npz (bert: logits [B, 2]; gpt2 /
    llama: logits [B, 4+S, V], the virtual positions first).  See PROMPT_INPUT_TREATMENT for
    what PEFT does with the inputs (checked by probe_prompt_inputs)."""
    task = PROMPT_TASK[arch]
    n = PROMPT_VIRTUAL_TOKENS
    rec = base_recording(arch)
    feeds = fixture_arrays(arch, "legacy", "inputs")
    base_out = run_outputs(rec, rec.model, feeds)

    cfg = PromptTuningConfig(task_type=task, num_virtual_tokens=n, prompt_tuning_init="RANDOM")
    init_seed = seed_of("prompt", arch)
    torch.manual_seed(init_seed)  # PromptEmbedding's nn.Embedding draws N(0, 1) from the global RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(rec.model, cfg)
    mts = perturb_modules_to_save(model, gen("prompt", arch, "modules_to_save"))
    if (task == "SEQ_CLS") != bool(mts):
        raise AssertionError(f"peft-prompt-{arch}: modules_to_save params {mts}")
    prompt = model.prompt_encoder["default"].embedding.weight.detach().clone()
    word_emb_name = next(nm for nm, m in rec.model.named_modules() if m is model.word_embeddings)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_adapter(model, out_dir)
    saved = safetensors.torch.load_file(str(out_dir / "adapter_model.safetensors"))
    if not torch.equal(saved["prompt_embeddings"], prompt):
        raise AssertionError(f"peft-prompt-{arch}: saved prompt_embeddings differ from the live embedding")
    for nm in mts:
        key = nm.replace(".modules_to_save.default", "")
        live = dict(model.named_parameters())[nm].detach()
        if key not in saved or not torch.equal(saved[key], live):
            raise AssertionError(f"peft-prompt-{arch}: {key} not saved as the perturbed head; saved {sorted(saved)}")

    model.eval()
    out = run_outputs(rec, model, feeds)
    shapes = {k: list(v.shape) for k, v in out.items()}
    b, s = feeds["input_ids"].shape
    want = [b, 2] if task == "SEQ_CLS" else [b, n + s, rec.config.vocab_size]
    if shapes["logits"] != want:
        raise AssertionError(f"peft-prompt-{arch}: logits shape {shapes['logits']}, expected {want}")
    real = out if task == "SEQ_CLS" else {k: v[:, n:] for k, v in out.items()}
    d_base = max_diff(real, base_out)
    if d_base < 1e-3:
        raise AssertionError(f"peft-prompt-{arch}: the prompt barely changes the outputs ({d_base:.3g})")
    probe = probe_prompt_inputs(rec, model, feeds, out)
    G.write_npz(out_dir / "outputs.npz", out)

    fresh = base_recording(arch)
    loaded = PeftModel.from_pretrained(fresh.model, str(out_dir))
    loaded.eval()
    d_reload = max_diff(run_outputs(fresh, loaded, feeds), out)
    if d_reload != 0.0:
        raise AssertionError(f"peft-prompt-{arch}: reloaded prompt differs from outputs.npz by {d_reload:.3g}")
    written = json.loads((out_dir / "adapter_config.json").read_text())
    return {
        "base_fixture": f"{arch}-legacy (same weights and inputs as {arch}-dynamo)",
        "inputs": f"models/fixtures/{arch}-legacy/inputs.npz",
        "peft": {"class": type(model).__name__, "config": "PromptTuningConfig(task_type=%r, num_virtual_tokens=%d, prompt_tuning_init='RANDOM')" % (task, n)},
        "task_type": task,
        "num_virtual_tokens": n,
        "token_dim": cfg.token_dim,
        "modules_to_save_in_config": written.get("modules_to_save"),
        "prompt_init": f"torch.manual_seed({init_seed}) then get_peft_model: torch.nn.Embedding({n}, {cfg.token_dim}) default init N(0, 1); "
        "not rescaled (max |logit| stays moderate)",
        "prompt_init_seed": init_seed,
        "prompt_embedding_std": float(prompt.std()),
        "word_embeddings": f"{word_emb_name} (std {float(model.word_embeddings.weight.std()):.4f})",
        "modules_to_save_params_perturbed": [nm.replace(".default", "") for nm in mts],
        "modules_to_save_noise": f"randn * {MODULES_TO_SAVE_NOISE}, torch.Generator seeded {seed_of('prompt', arch, 'modules_to_save')}, sorted names"
        if mts
        else None,
        "base_output_shapes": {k: list(v.shape) for k, v in base_out.items()},
        "output_shapes": shapes,
        "outputs_npz": "exactly what the PeftModel returns via rec.run (" + PROMPT_INPUT_TREATMENT[task]["outputs"] + ")",
        "max_abs_prompt_vs_base": d_base,
        "prompt_vs_base_compared_on": "all logits" if task == "SEQ_CLS" else f"logits[:, {n}:] (the real-token positions) vs the base logits",
        "max_abs_reloaded_vs_outputs": d_reload,
        "max_abs_output": max(float(np.max(np.abs(a))) for a in out.values()),
        "max_abs_base_output": max(float(np.max(np.abs(a))) for a in base_out.values()),
        "peft_input_treatment": {**PROMPT_INPUT_TREATMENT["common"], **PROMPT_INPUT_TREATMENT[task]},
        "peft_input_probe": probe,
        "tensors": safetensors_summary(out_dir / "adapter_model.safetensors"),
    }


# --------------------------------------------------------------------------------------
# 1c. PEFT prefix tuning: prefix key/value table + outputs
# --------------------------------------------------------------------------------------

PREFIX_VIRTUAL_TOKENS = 4
PREFIX_STD = 0.5  # the saved table <- seeded N(0, PREFIX_STD^2), so that it is clearly non-zero
PREFIX_MAPPING_TOL = 1e-5  # hand-built past (plain HF model / fixture ONNX) vs PEFT's logits

# How PEFT 0.21.2 maps the saved table to the per-layer past key/value tensors and treats the
# inputs of a CAUSAL_LM prefix-tuning forward; written into the manifest and checked by
# record_prefix_tuning / probe_prefix_inputs.  L = num_layers, n = num_virtual_tokens,
# H = the config's num_attention_heads (= the model's KV heads), hd = token_dim // H.
PREFIX_TREATMENT = {
    "saved_table": "adapter_model.safetensors holds ONE tensor, `prompt_embeddings` [n, L*2*token_dim] (float32) = "
    "PrefixEncoder.embedding.weight (prefix_projection=False: the embedding IS the flattened key/value prefix; "
    "BasePromptEncoder._get_adapter_state_dict -> get_prompt_embedding_to_save = prompt_encoder(arange(n))[0]). "
    "Row t is virtual position t.",
    "token_dim": "utils/other.py _prepare_prompt_learning_config: token_dim = hidden_size (gpt2: n_embd), "
    "num_attention_heads = the config's heads; for a config with num_key_value_heads (llama) and PREFIX_TUNING it is "
    "REPLACED by token_dim = head_dim * num_key_value_heads and num_attention_heads = num_key_value_heads "
    "(head_dim = config.head_dim, else hidden_size // num_attention_heads). adapter_config.json stores these replaced "
    "values (llama fixture: token_dim 16, num_attention_heads 2 — the KV heads, not the 4 query heads).",
    "table_to_past": "peft_model.py get_prompt: table.repeat(B, 1, 1).view(B, n, 2L, H, hd).permute(2, 0, 3, 1, 4) "
    "-> [2L, B, H, n, hd], .split(2) -> L chunks [2, B, H, n, hd]; chunk i = (key_i, value_i); DynamicCache(chunks). "
    "Index form: key_i[b, h, t, d] = table[t, (2i)*H*hd + h*hd + d], value_i[b, h, t, d] = table[t, (2i+1)*H*hd + h*hd + d] "
    "(same for every b). I.e. the last axis is [layer, {key, value}, head, head_dim] row-major: layer i's key is columns "
    "[2i*token_dim, (2i+1)*token_dim), its value the next token_dim columns, each head-major (head h = hd consecutive "
    "columns). No RoPE or other transform is applied: the tensors are used as cached (post-RoPE) keys and values.",
    "input_ids": "passed to the HF model unchanged (no inputs_embeds; the virtual tokens exist only as past key/values)",
    "past_key_values": "PeftModelForCausalLM.forward overwrites kwargs['past_key_values'] with get_prompt(B): a DynamicCache "
    "holding n positions per layer (transformers 5 maps the deprecated kwarg to `cache`); any past the caller passes is "
    "discarded",
    "attention_mask": "torch.cat((torch.ones(B, n), attention_mask), dim=1): n ones PREPENDED (float32, so the int64 mask is "
    "promoted and the HF model receives a float32 [B, n+S] mask of 1.0/0.0); the virtual positions are always attended",
    "position_ids": "not given (as in outputs.npz): the HF model counts from the cache length, position_ids = n + arange(S) "
    "(gpt2: wpe rows n..n+S-1; llama: RoPE angles of positions n..n+S-1 on q and on the new k). If given: "
    "_adjust_prompt_learning_kwargs ADDS n (position_ids + num_virtual_tokens) and passes them on",
    "token_type_ids": "dropped (warning 'Token type ids are not supported ...', set to None)",
    "labels": "passed through UNCHANGED ([B, S], no -100 prefix: the logits cover only the S real tokens); the HF loss is "
    "the usual shifted cross entropy over them",
    "outputs": "logits [B, S, vocab] (no virtual positions); with use_cache the returned cache holds n+S positions",
    "inference_mode": "PeftModel.from_pretrained (inference_mode=True): get_prompt uses embedding.weight.repeat(B, 1, 1) "
    "instead of prompt_encoder(prompt_tokens) — the same values",
}


def prefix_past_from_table(table: np.ndarray, n_layers: int, heads: int, head_dim: int, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stated mapping, with explicit indices (independent of PEFT's view/permute code):
    key_i[b, h, t, d] = table[t, (2i)*H*hd + h*hd + d], value_i[b, h, t, d] = table[t, (2i+1)*H*hd + h*hd + d]."""
    n = table.shape[0]
    token_dim = heads * head_dim
    if table.shape[1] != n_layers * 2 * token_dim:
        raise AssertionError(f"table {table.shape} is not [n, {n_layers}*2*{token_dim}]")
    out = []
    for i in range(n_layers):
        kv = []
        for which in (0, 1):  # 0 = key, 1 = value
            t_ = np.empty((batch, heads, n, head_dim), dtype=table.dtype)
            for b in range(batch):
                for h in range(heads):
                    for t in range(n):
                        for d in range(head_dim):
                            t_[b, h, t, d] = table[t, (2 * i + which) * token_dim + h * head_dim + d]
            kv.append(t_)
        out.append((kv[0], kv[1]))
    return out


def wrong_layouts(table: np.ndarray, n_layers: int, heads: int, head_dim: int, batch: int) -> dict[str, list]:
    """Plausible but wrong readings of the table (negative controls for the mapping check)."""
    n, token_dim = table.shape[0], heads * head_dim

    def tile(x):  # [n, H, hd] -> [B, H, n, hd]
        return np.ascontiguousarray(np.broadcast_to(x.transpose(1, 0, 2)[None], (batch, heads, n, head_dim)))

    right = prefix_past_from_table(table, n_layers, heads, head_dim, batch)
    kv_major = table.reshape(n, 2, n_layers, token_dim)  # [key of all layers, value of all layers]
    return {
        "key_and_value_swapped": [(v, k) for k, v in right],
        "kv_major_last_axis ([2, L, H, hd] instead of [L, 2, H, hd])": [
            (tile(kv_major[:, 0, i].reshape(n, heads, head_dim)), tile(kv_major[:, 1, i].reshape(n, heads, head_dim)))
            for i in range(n_layers)
        ],
        "head_dim_major_within_layer ([hd, H] instead of [H, hd])": [
            tuple(tile(table[:, (2 * i + w) * token_dim:(2 * i + w + 1) * token_dim].reshape(n, head_dim, heads).transpose(0, 2, 1)) for w in (0, 1))
            for i in range(n_layers)
        ],
    }


def run_with_prefix_past(model, config, ids: torch.Tensor, mask: torch.Tensor, past: list, **extra) -> torch.Tensor:
    """The plain HF model with `past` ([(key, value)] per layer) as its cache and n ones prepended to the mask."""
    n = past[0][0].shape[2]
    cache = transformers.DynamicCache([(torch.from_numpy(k), torch.from_numpy(v)) for k, v in past], config=config)
    ext = torch.cat((torch.ones(ids.shape[0], n, dtype=mask.dtype), mask), dim=1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=ext, cache=cache, use_cache=True, return_dict=True, **extra).logits


def check_past_fixture(arch: str, rec: G.Recording) -> dict:
    """base_recording(arch) has the weights of the <arch>-past fixtures: with the fixture's own past inputs it
    reproduces fixtures/<arch>-past-<exporter>/outputs.npz (logits and present.*)."""
    past_rec = G.REGISTRY[f"{arch}-past"]()
    sd_a, sd_b = rec.model.state_dict(), past_rec.model.state_dict()
    same = sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    if not same:
        raise AssertionError(f"{arch}: base_recording weights differ from generate.REGISTRY['{arch}-past']")
    res = {"state_dict_equal_to_registry_past_model": same}
    for exporter in G.EXPORTERS:
        feeds = fixture_arrays(f"{arch}-past", exporter, "inputs")
        want = fixture_arrays(f"{arch}-past", exporter, "outputs")
        got = run_outputs(past_rec, rec.model, feeds)  # the -past fixture's run (DynamicCache of the fixture's past), base_recording's model
        d = max_diff(got, want)
        if d > FIXTURE_TOL:
            raise AssertionError(f"{arch}-past-{exporter}: base_recording('{arch}') with the fixture's past differs from outputs.npz by {d:.3g}")
        res[exporter] = {"max_abs_diff": d, "bit_identical": all(np.array_equal(got[k], want[k]) for k in want), "compared": sorted(want)}
    a, b = fixture_arrays(f"{arch}-past", "legacy", "inputs"), fixture_arrays(f"{arch}-past", "dynamo", "inputs")
    res["legacy_and_dynamo_inputs_identical"] = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    res["how"] = (f"generate.REGISTRY['{arch}-past']().run (fixture past -> DynamicCache, use_cache=True) applied to "
                  f"base_recording('{arch}').model on fixtures/{arch}-past-<exporter>/inputs.npz")
    return res


@torch.no_grad()
def probe_prefix_inputs(rec: G.Recording, model, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray], past: list) -> dict:
    """Check PREFIX_TREATMENT against the kwargs PEFT passes to the HF model (forward pre-hook): call 1 is the
    recording's own run (rec.run); call 2 adds position_ids = arange(S), token_type_ids, labels and use_cache=True."""
    n = model.active_peft_config.num_virtual_tokens
    seen = []

    def hook(_mod, args, kwargs):
        snap = {}
        for k, v in kwargs.items():
            if torch.is_tensor(v):
                snap[k] = v.detach().clone()
            elif isinstance(v, transformers.Cache):
                snap[k] = {"type": type(v).__name__, "seq_length": v.get_seq_length(),
                           "layers": [(ly.keys.detach().clone(), ly.values.detach().clone()) for ly in v.layers]}
            else:
                snap[k] = v
        seen.append((len(args), snap))

    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    b, s = ids.shape
    handle = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        plain = run_outputs(rec, model, feeds)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(s).expand(b, s).contiguous(),
                        token_type_ids=torch.ones(b, s, dtype=torch.int64), labels=ids.clone(), use_cache=True, return_dict=True)
    finally:
        handle.remove()
    if len(seen) != 2 or any(nargs for nargs, _ in seen):
        raise AssertionError(f"prefix: expected 2 keyword-only calls of the HF model, got {[(a, sorted(k)) for a, k in seen]}")
    k1, k2 = seen[0][1], seen[1][1]

    def fail(what):
        raise AssertionError(f"prefix {rec.arch}: {what}")

    want_mask = torch.cat((torch.ones(b, n), mask), dim=1)
    for k in (k1, k2):
        if not torch.equal(k.get("input_ids"), ids) or k.get("inputs_embeds") is not None:
            fail("input_ids not passed unchanged")
        if k["attention_mask"].dtype != torch.float32 or not torch.equal(k["attention_mask"], want_mask):
            fail("attention_mask != cat(ones(B, n), mask) as float32")
        c = k.get("past_key_values")
        if not isinstance(c, dict) or c["type"] != "DynamicCache" or c["seq_length"] != n or len(c["layers"]) != len(past):
            fail(f"past_key_values is not a DynamicCache of {n} positions: {c if not isinstance(c, dict) else c['type']}")
        for (kk, vv), (wk, wv) in zip(c["layers"], past):
            if not (torch.equal(kk, torch.from_numpy(wk)) and torch.equal(vv, torch.from_numpy(wv))):
                fail("PEFT's cache != the hand-built past (prefix_past_from_table)")
        if k.get("token_type_ids") is not None:
            fail("token_type_ids reached the HF model")
    if k1.get("position_ids") is not None:
        fail("position_ids passed on call 1")
    if not torch.equal(k2["position_ids"], torch.arange(s).expand(b, s) + n):
        fail("position_ids != given + n")
    if not torch.equal(k2["labels"], ids):
        fail("labels changed")
    if max_diff(plain, out) != 0.0:
        fail("run not reproducible")
    logits = torch.from_numpy(out["logits"])
    d_call2 = float((res.logits - logits).abs().max())
    if d_call2 != 0.0:
        fail(f"position_ids=arange(S) (+n by PEFT) / token_type_ids / labels / use_cache changed the logits by {d_call2:.3g}")
    explicit_loss = F.cross_entropy(res.logits[:, :-1].reshape(-1, res.logits.shape[-1]), ids[:, 1:].reshape(-1))
    d_loss = abs(float(res.loss) - float(explicit_loss))
    if d_loss > 1e-6:
        fail(f"loss != cross_entropy(logits[:, :-1], labels[:, 1:]) ({d_loss:.3g})")
    present = res.cache.get_seq_length() if res.cache is not None else None
    if present != n + s:
        fail(f"returned cache holds {present} positions, expected n+S")

    def desc(v):
        if torch.is_tensor(v):
            return {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        if isinstance(v, dict) and "layers" in v:
            return {"type": v["type"], "seq_length": v["seq_length"], "layers": len(v["layers"]),
                    "key_shape": list(v["layers"][0][0].shape), "value_shape": list(v["layers"][0][1].shape)}
        return v

    return {
        "kwargs_reaching_hf_model_on_rec_run": {k: desc(v) for k, v in sorted(k1.items())},
        "kwargs_reaching_hf_model_with_position_ids_labels_token_type_ids": {k: desc(v) for k, v in sorted(k2.items())},
        "extra_call": "model(input_ids, attention_mask, position_ids=arange(S), token_type_ids=ones, labels=input_ids, use_cache=True): "
        "position_ids reach the HF model as arange(S) + n, labels unchanged [B, S], token_type_ids None; logits identical to "
        "outputs.npz (max abs diff 0.0); the returned cache holds n+S positions",
        "loss_vs_explicit_shifted_cross_entropy": d_loss,
        "peft_warnings": sorted({str(w.message) for w in caught if "not supported" in str(w.message)}),
        "checked": "input_ids passed unchanged, no inputs_embeds; attention_mask = cat(ones(B, n), mask) float32; past_key_values = "
        "DynamicCache of n positions equal (bit for bit) to prefix_past_from_table; token_type_ids None; position_ids None "
        "(call 1) / given + n (call 2); labels unchanged",
    }


def record_prefix_tuning(arch: str, out_dir: Path) -> dict:
    """HF PEFT prefix tuning: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=False).

    Base model: base_recording(arch) (the gpt2 / llama recordings' model), checked to carry the weights of the
    <arch>-past fixtures (check_past_fixture).  torch.manual_seed(seed_of("prefix", arch)) right before
    get_peft_model (PrefixEncoder's nn.Embedding draws N(0, 1)); then the table is overwritten with seeded
    N(0, 0.5^2) values (gen("prefix", arch)).  Inputs: the <arch>-past-legacy fixture's input_ids and the last S
    columns of its attention_mask (its inputs without the past), saved as inputs.npz; outputs.npz = exactly what the
    PeftModel returns (logits [B, S, V]).  The table -> past mapping (PREFIX_TREATMENT) is checked by building the
    past by hand, feeding it to the plain HF model and to the <arch>-past fixture ONNX graphs (onnxruntime)."""
    n = PREFIX_VIRTUAL_TOKENS
    name = f"peft-prefix-{arch}"
    rec = base_recording(arch)
    past_check = check_past_fixture(arch, rec)
    past_feeds = fixture_arrays(f"{arch}-past", "legacy", "inputs")
    p = past_feeds["past_key_values.0.key"].shape[2]
    feeds = {
        "input_ids": np.ascontiguousarray(past_feeds["input_ids"]),
        "attention_mask": np.ascontiguousarray(past_feeds["attention_mask"][:, p:]),
    }
    b, s = feeds["input_ids"].shape
    if feeds["attention_mask"].shape != (b, s):
        raise AssertionError(f"{name}: attention_mask[:, {p}:] has shape {feeds['attention_mask'].shape}, expected {(b, s)}")
    base_out = run_outputs(rec, rec.model, feeds)

    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=False)
    init_seed = seed_of("prefix", arch)
    torch.manual_seed(init_seed)  # PrefixEncoder's nn.Embedding draws N(0, 1) from the global RNG (overwritten below)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(rec.model, cfg)
    pc = model.peft_config["default"]
    heads, token_dim, n_layers = pc.num_attention_heads, pc.token_dim, pc.num_layers
    head_dim = token_dim // heads
    hf = rec.config
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    model_head_dim = hf.hidden_size // hf.num_attention_heads
    if (heads, head_dim, n_layers) != (kv_heads, model_head_dim, hf.num_hidden_layers):
        raise AssertionError(f"{name}: PEFT heads/head_dim/layers {(heads, head_dim, n_layers)} != the model's KV layout")
    emb = model.prompt_encoder["default"].embedding
    with torch.no_grad():
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=gen("prefix", arch), dtype=emb.weight.dtype) * PREFIX_STD)
    table = emb.weight.detach().clone()
    if list(table.shape) != [n, n_layers * 2 * token_dim]:
        raise AssertionError(f"{name}: embedding {list(table.shape)}")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_adapter(model, out_dir)
    saved = safetensors.torch.load_file(str(out_dir / "adapter_model.safetensors"))
    if sorted(saved) != ["prompt_embeddings"] or not torch.equal(saved["prompt_embeddings"], table):
        raise AssertionError(f"{name}: saved {sorted(saved)} is not exactly prompt_embeddings = the live table")

    model.eval()
    out = run_outputs(rec, model, feeds)
    shapes = {k: list(v.shape) for k, v in out.items()}
    if shapes["logits"] != [b, s, rec.config.vocab_size]:
        raise AssertionError(f"{name}: logits shape {shapes['logits']}, expected [B, S, V]")
    d_base = max_diff(out, base_out)
    if d_base < 1e-3:
        raise AssertionError(f"{name}: the prefix barely changes the outputs ({d_base:.3g})")
    logits = torch.from_numpy(out["logits"])

    # the mapping, by hand: past from the SAVED table -> plain HF model (fresh), mask extended by n ones
    past = prefix_past_from_table(saved["prompt_embeddings"].numpy(), n_layers, heads, head_dim, b)
    with torch.no_grad():
        peft_past = model.get_prompt(b)
    d_get_prompt = max(
        max(float((ly.keys - torch.from_numpy(k)).abs().max()), float((ly.values - torch.from_numpy(v)).abs().max()))
        for ly, (k, v) in zip(peft_past.layers, past)
    )
    if d_get_prompt != 0.0:
        raise AssertionError(f"{name}: PEFT get_prompt != prefix_past_from_table ({d_get_prompt:.3g})")
    fresh = base_recording(arch)
    ids_t, mask_t = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    d_manual = float((run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t, past) - logits).abs().max())
    d_manual_pos = float((run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t, past,
                                               position_ids=(torch.arange(s) + n).expand(b, s).contiguous()) - logits).abs().max())
    d_manual_f32 = float((run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t.float(), past) - logits).abs().max())
    if max(d_manual, d_manual_pos, d_manual_f32) > PREFIX_MAPPING_TOL:
        raise AssertionError(f"{name}: hand-built past vs PEFT: {d_manual:.3g} / {d_manual_pos:.3g} / {d_manual_f32:.3g}")
    d_wrong = {k: float((run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t, w) - logits).abs().max())
               for k, w in wrong_layouts(saved["prompt_embeddings"].numpy(), n_layers, heads, head_dim, b).items()}
    if min(d_wrong.values()) < 1e-3:
        raise AssertionError(f"{name}: a wrong layout reproduces PEFT's logits: {d_wrong}")
    d_pos0 = float((run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t, past,
                                         position_ids=torch.arange(s).expand(b, s).contiguous()) - logits).abs().max())
    # the fed mask is all ones (the fixture pads only inside its past): repeat the check with a padded mask
    padded = mask_t.clone()
    padded[-1, -2:] = 0  # last example right-padded by 2
    with torch.no_grad():
        peft_padded = model(input_ids=ids_t, attention_mask=padded, use_cache=False, return_dict=True).logits
    d_manual_padded = float((run_with_prefix_past(fresh.model, fresh.config, ids_t, padded, past) - peft_padded).abs().max())
    d_padded_vs_unpadded = float((peft_padded - logits).abs().max())
    if d_manual_padded > PREFIX_MAPPING_TOL or d_padded_vs_unpadded < 1e-3:
        raise AssertionError(f"{name}: padded mask: hand-built vs PEFT {d_manual_padded:.3g}, padded vs unpadded {d_padded_vs_unpadded:.3g}")

    # the same past fed to the <arch>-past fixture graphs (ORT): the ONNX form of the mapping
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    d_ort = {}
    for exporter in G.EXPORTERS:
        sess = ort.InferenceSession(str(FIXTURES_DIR / f"{arch}-past-{exporter}" / "model.onnx"), so, providers=["CPUExecutionProvider"])
        for label, m, want in (("", feeds["attention_mask"], out["logits"]), (" (padded mask)", padded.numpy(), peft_padded.numpy())):
            ort_feeds = {"input_ids": feeds["input_ids"], "attention_mask": np.concatenate((np.ones((b, n), dtype=m.dtype), m), axis=1)}
            for i, (k, v) in enumerate(past):
                ort_feeds[f"past_key_values.{i}.key"], ort_feeds[f"past_key_values.{i}.value"] = k, v
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ort_feeds)))
            d_ort[f"{arch}-past-{exporter}{label}"] = float(np.max(np.abs(got["logits"].astype(np.float64) - want.astype(np.float64))))
    if max(d_ort.values()) > PREFIX_MAPPING_TOL:
        raise AssertionError(f"{name}: fixture ONNX with the hand-built past vs PEFT: {d_ort}")

    probe = probe_prefix_inputs(rec, model, feeds, out, past)
    G.write_npz(out_dir / "outputs.npz", out)
    G.write_npz(out_dir / "inputs.npz", feeds)

    fresh2 = base_recording(arch)
    loaded = PeftModel.from_pretrained(fresh2.model, str(out_dir))
    loaded.eval()
    d_reload = max_diff(run_outputs(fresh2, loaded, feeds), out)
    if d_reload != 0.0:
        raise AssertionError(f"{name}: reloaded prefix differs from outputs.npz by {d_reload:.3g}")
    written = json.loads((out_dir / "adapter_config.json").read_text())
    return {
        "base_fixture": f"{arch}-past-legacy (= {arch}-past-dynamo; same weights as {arch}-legacy / -dynamo)",
        "base_model": f"base_recording('{arch}')",
        "inputs": f"inputs.npz (in this folder) = models/fixtures/{arch}-past-legacy/inputs.npz input_ids and attention_mask[:, {p}:] "
        f"(the fixture's inputs without its past of P={p}; every fed mask entry is 1: the fixture pads only inside the past)",
        "past_fixture_check": past_check,
        "peft": {"class": type(model).__name__,
                 "config": f"PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens={n}, prefix_projection=False)"},
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": n,
        "adapter_config_prefix_fields": {k: written.get(k) for k in ("peft_type", "num_virtual_tokens", "token_dim", "num_attention_heads",
                                                                       "num_layers", "num_transformer_submodules", "encoder_hidden_size",
                                                                       "prefix_projection", "inference_mode")},
        "model_heads": {"num_attention_heads": hf.num_attention_heads, "num_key_value_heads": kv_heads, "head_dim": model_head_dim},
        "token_dim": token_dim,
        "token_dim_rule": f"{kv_heads} KV heads x head_dim {head_dim}" + (
            f" (GQA: PEFT replaces hidden_size {hf.hidden_size} / {hf.num_attention_heads} heads by num_key_value_heads * head_dim)"
            if kv_heads != hf.num_attention_heads else " = hidden_size (no num_key_value_heads in the config)"),
        "table": {"key": "prompt_embeddings", "shape": list(table.shape), "layout": f"[n={n}, L={n_layers} x 2 x H={heads} x hd={head_dim}]"},
        "table_to_past_formula": f"key_i[b, h, t, d] = prompt_embeddings[t, (2*i)*{token_dim} + h*{head_dim} + d]; "
        f"value_i[b, h, t, d] = prompt_embeddings[t, (2*i+1)*{token_dim} + h*{head_dim} + d]; past tensors [B, {heads}, {n}, {head_dim}]",
        "prefix_init": f"torch.manual_seed({init_seed}) then get_peft_model (PrefixEncoder nn.Embedding N(0, 1)), then embedding.weight <- "
        f"randn * {PREFIX_STD} from torch.Generator seeded {seed_of('prefix', arch)} (gen('prefix', '{arch}'))",
        "prefix_init_seed": init_seed,
        "prefix_table_std": float(table.std()),
        "base_output_shapes": {k: list(v.shape) for k, v in base_out.items()},
        "output_shapes": shapes,
        "outputs_npz": "exactly what the PeftModel returns via the recording's rec.run (use_cache=False): logits [B, S, V]",
        "max_abs_prefix_vs_base": d_base,
        "max_abs_get_prompt_vs_formula": d_get_prompt,
        "max_abs_hand_built_past_vs_outputs": {
            "plain HF model, cache = formula past, mask = cat(ones int64, mask), default positions": d_manual,
            "same, explicit position_ids = n + arange(S)": d_manual_pos,
            "same, float32 mask": d_manual_f32,
            "padded mask (last example right-padded by 2; PEFT called with it too, not in outputs.npz)": d_manual_padded,
            "fixture ONNX graphs (onnxruntime), past_key_values.{i}.key/value = formula past, attention_mask = cat(ones, mask)": d_ort,
        },
        "max_abs_wrong_layouts_vs_outputs (negative controls)": d_wrong,
        "max_abs_padded_mask_vs_outputs (the padded-mask check changes the logits)": d_padded_vs_unpadded,
        "max_abs_positions_from_0_vs_outputs (positions arange(S) instead of n + arange(S))": d_pos0,
        "max_abs_reloaded_vs_outputs": d_reload,
        "max_abs_output": max(float(np.max(np.abs(a))) for a in out.values()),
        "max_abs_base_output": max(float(np.max(np.abs(a))) for a in base_out.values()),
        "peft_treatment": PREFIX_TREATMENT,
        "peft_input_probe": probe,
        "tensors": safetensors_summary(out_dir / "adapter_model.safetensors"),
    }


# --------------------------------------------------------------------------------------
# 1d. PEFT prefix tuning on encoders (SEQ_CLS): prefix table + classifier, reference outputs
# --------------------------------------------------------------------------------------

ENCODER_PREFIX_ERROR = "Model does not support past key values which are required for prefix tuning."

# What PEFT 0.21.2 does for a SEQ_CLS prefix-tuning forward (peft_model.py PeftModelForSequenceClassification.forward
# + _prefix_tuning_forward) and why it cannot run under transformers 5.24; written into the manifest and checked by
# record_encoder_prefix (a shim that lets PEFT's own code run, the kwargs reaching the backbone, positions).
ENCODER_PREFIX_TREATMENT = {
    "peft_forward_refuses": "PeftModelForSequenceClassification.forward -> _prefix_tuning_forward: 'past_key_values' is not a "
    "parameter of <Bert|Roberta>ForSequenceClassification.forward, so PEFT falls back to the backbone (transformer_backbone_name "
    "= 'bert' / 'roberta', a BertModel / RobertaModel) and checks inspect.signature(backbone.forward) for 'past_key_values'; "
    "transformers 5 renamed that parameter to `cache` (@deprecate_kwarg('past_key_values', '5.40.0', new_name='cache')), so PEFT "
    f"raises ValueError('{ENCODER_PREFIX_ERROR}') before calling the model. get_peft_model, save_pretrained, "
    "PeftModel.from_pretrained and get_prompt work.",
    "outputs_npz_source": "computed with transformers, not PEFT: the plain HF <Bert|Roberta>ForSequenceClassification (fresh "
    "base_recording) with its classifier loaded from the saved base_model.classifier.* (= PEFT's perturbed modules_to_save copy), "
    "called with cache = DynamicCache(formula past of the saved table), attention_mask = cat(ones(B, n), mask), token_type_ids "
    "unchanged (bert), input_ids unchanged, no position_ids. This is what PEFT's _prefix_tuning_forward would feed (checked: with "
    "the backbone's forward wrapped to take `past_key_values` and pass it on as `cache`, PEFT's own forward runs and returns the "
    "same logits bit for bit)",
    "saved_files": "adapter_model.safetensors: prompt_embeddings [n, L*2*token_dim] (PrefixEncoder.embedding.weight, token_dim = "
    "hidden_size, num_attention_heads = the model's heads: no num_key_value_heads in BERT/RoBERTa configs) and "
    "base_model.classifier.* (the modules_to_save copy, adapter name removed; PEFT adds 'classifier' and 'score' to "
    "modules_to_save for SEQ_CLS)",
    "table_to_past": "as for the decoders (PREFIX_TREATMENT['table_to_past']): get_prompt -> DynamicCache(L chunks); "
    "key_i[b, h, t, d] = table[t, (2i)*token_dim + h*hd + d], value_i[b, h, t, d] = table[t, (2i+1)*token_dim + h*hd + d]. "
    "BERT/RoBERTa self-attention concatenates cache keys/values in front of the new ones (cache.update) even though the "
    "model is not a decoder: attention is bidirectional over [n prefix + S real] keys, queries = the S real tokens",
    "input_ids": "passed unchanged (no inputs_embeds)",
    "attention_mask": "torch.cat((torch.ones(B, n), attention_mask), dim=1): n ones PREPENDED, float32 [B, n+S] "
    "(int64 and float32 give identical logits)",
    "token_type_ids": "bert: passed UNCHANGED [B, S] (_adjust_prompt_learning_kwargs(remove_token_type_ids=False); the zeros "
    "are prepended only in the prompt-tuning branch); roberta: none given (the model uses its all-zero buffer)",
    "position_ids": "not given: the HF embeddings count from the cache length n (bert: position_ids = n + arange(S), the pads "
    "included; roberta: create_position_ids_from_input_ids(input_ids, pad, cache_length=n) = (cumsum(ids != pad) + n) * "
    "(ids != pad) + pad, i.e. real token j (no left padding) at pad + 1 + n + j, pad tokens at pad). If given, PEFT ADDS n",
    "pooling": "PEFT's fallback takes outputs[1] if len(outputs) > 1 else outputs[0] of the backbone (bert: pooler_output; "
    "roberta: add_pooling_layer=False, so the only non-None field, last_hidden_state), applies base_model.dropout if the "
    "model has a `dropout` child (bert; identity in eval) and the classifier (bert: Linear on the pooled [CLS]; roberta: "
    "RobertaClassificationHead on last_hidden_state[:, 0]) -- the same computation as the HF model's own forward. The "
    "pooled / classified token is the FIRST REAL token (the prefix has no hidden states, unlike prompt tuning)",
    "outputs": "logits [B, num_labels] = [B, 2]",
}


def encoder_prefix_positions(ids: torch.Tensor, arch: str, n: int, pad: int) -> torch.Tensor:
    """The position ids the HF embeddings use for `ids` after a cache of n positions (stated rule, explicit)."""
    b, s = ids.shape
    if arch == "bert":
        return (torch.arange(s) + n).expand(b, s).contiguous()
    real = (ids != pad).long()
    return (torch.cumsum(real, dim=1) + n) * real + pad


def record_encoder_prefix(arch: str, out_dir: Path) -> dict:
    """HF PEFT prefix tuning on an encoder: PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4,
    prefix_projection=False) on base_recording(arch) (BertForSequenceClassification / RobertaForSequenceClassification).

    torch.manual_seed(seed_of("prefix", arch)) before get_peft_model (as the decoder recordings); the table is then
    overwritten with seeded N(0, 0.5^2) (gen("prefix", arch)) and PEFT's modules_to_save classifier copy perturbed
    (perturb_modules_to_save, gen("prefix", arch, "modules_to_save")); saved with save_adapter (prompt_embeddings +
    base_model.classifier.*).  PEFT 0.21.2's SEQ_CLS prefix forward refuses these models under transformers 5.24
    (ENCODER_PREFIX_ERROR), so outputs.npz is computed with transformers: the plain HF model with the saved classifier,
    cache = DynamicCache of the formula past, mask with n ones prepended (ENCODER_PREFIX_TREATMENT); checked against
    PEFT's own forward run through a signature shim, and the positions the embeddings use are checked explicitly."""
    n = PREFIX_VIRTUAL_TOKENS
    name = f"prefix-{arch}"
    rec = base_recording(arch)
    hf = rec.config
    pad = hf.pad_token_id
    feeds = fixture_arrays(arch, "legacy", "inputs")
    b, s = feeds["input_ids"].shape
    base_out = run_outputs(rec, rec.model, feeds)
    base_classifier = {k: v.detach().clone() for k, v in rec.model.classifier.state_dict().items()}

    cfg = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n, prefix_projection=False)
    init_seed = seed_of("prefix", arch)
    torch.manual_seed(init_seed)  # PrefixEncoder's nn.Embedding draws N(0, 1) from the global RNG (overwritten below)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(rec.model, cfg)
    pc = model.peft_config["default"]
    heads, token_dim, n_layers = pc.num_attention_heads, pc.token_dim, pc.num_layers
    head_dim = token_dim // heads
    if (heads, token_dim, n_layers) != (hf.num_attention_heads, hf.hidden_size, hf.num_hidden_layers):
        raise AssertionError(f"{name}: PEFT heads/token_dim/layers {(heads, token_dim, n_layers)} != the model's")
    emb = model.prompt_encoder["default"].embedding
    with torch.no_grad():
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=gen("prefix", arch), dtype=emb.weight.dtype) * PREFIX_STD)
    table = emb.weight.detach().clone()
    if list(table.shape) != [n, n_layers * 2 * token_dim]:
        raise AssertionError(f"{name}: embedding {list(table.shape)}")
    mts = perturb_modules_to_save(model, gen("prefix", arch, "modules_to_save"))
    if not mts or any(".classifier.modules_to_save.default." not in nm for nm in mts):
        raise AssertionError(f"{name}: modules_to_save params {mts}")
    live = dict(model.named_parameters())

    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_adapter(model, out_dir)
    saved = safetensors.torch.load_file(str(out_dir / "adapter_model.safetensors"))
    want_keys = sorted(["prompt_embeddings"] + [nm.replace(".modules_to_save.default", "") for nm in mts])
    if sorted(saved) != want_keys:
        raise AssertionError(f"{name}: saved keys {sorted(saved)}, expected {want_keys}")
    if not torch.equal(saved["prompt_embeddings"], table):
        raise AssertionError(f"{name}: saved prompt_embeddings != the live table")
    for nm in mts:
        if not torch.equal(saved[nm.replace(".modules_to_save.default", "")], live[nm].detach()):
            raise AssertionError(f"{name}: saved {nm} != the live perturbed classifier")
    saved_classifier = {k[len("base_model.classifier."):]: v for k, v in saved.items() if k.startswith("base_model.classifier.")}
    model.eval()

    # PEFT's own forward refuses (the signature check; see ENCODER_PREFIX_TREATMENT)
    ids_t, mask_t = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    tt = {"token_type_ids": torch.from_numpy(feeds["token_type_ids"])} if "token_type_ids" in feeds else {}
    try:
        with torch.no_grad():
            run_outputs(rec, model, feeds)
        refusal = None
    except ValueError as e:
        refusal = str(e)
    if refusal != ENCODER_PREFIX_ERROR:
        raise AssertionError(f"{name}: PEFT's forward no longer refuses as expected (got {refusal!r}); use its outputs instead")
    backbone = model.base_model.get_submodule(model.transformer_backbone_name)
    sig_model = list(inspect.signature(model.base_model.forward).parameters)
    sig_backbone = list(inspect.signature(backbone.forward).parameters)
    if "past_key_values" in sig_model or "past_key_values" in sig_backbone or "cache" not in sig_backbone:
        raise AssertionError(f"{name}: unexpected signatures {sig_model} / {sig_backbone}")

    # the reference: fresh plain HF model + the SAVED classifier + the formula past of the SAVED table
    past = prefix_past_from_table(saved["prompt_embeddings"].numpy(), n_layers, heads, head_dim, b)
    with torch.no_grad():
        peft_past = model.get_prompt(b)
    d_get_prompt = max(
        max(float((ly.keys - torch.from_numpy(k)).abs().max()), float((ly.values - torch.from_numpy(v)).abs().max()))
        for ly, (k, v) in zip(peft_past.layers, past)
    )
    if type(peft_past).__name__ != "DynamicCache" or d_get_prompt != 0.0:
        raise AssertionError(f"{name}: PEFT get_prompt ({type(peft_past).__name__}) != prefix_past_from_table ({d_get_prompt:.3g})")
    fresh = base_recording(arch)
    fresh.model.classifier.load_state_dict(saved_classifier, strict=True)
    positions_seen = []
    hook = fresh.model.get_submodule(f"{arch}.embeddings.position_embeddings").register_forward_hook(
        lambda _m, a, _o: positions_seen.append(a[0].detach().clone()))
    try:
        logits = run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t, past, **tt)
        used_positions = positions_seen[-1]
        d_f32 = float((run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t.float(), past, **tt) - logits).abs().max())
        # left-padded probe (not in outputs.npz): which positions does a left-padded example get?
        lp_ids, lp_mask = ids_t.clone(), mask_t.clone()
        lp_ids[-1] = torch.cat((torch.full((2,), pad), ids_t[-1, :-2]))
        lp_mask[-1] = torch.cat((torch.zeros(2, dtype=mask_t.dtype), torch.ones(s - 2, dtype=mask_t.dtype)))
        run_with_prefix_past(fresh.model, fresh.config, lp_ids, lp_mask, past, **tt)
        left_padded_positions = positions_seen[-1]
    finally:
        hook.remove()
    out = {"logits": logits.numpy()}
    if list(logits.shape) != [b, hf.num_labels]:
        raise AssertionError(f"{name}: logits {list(logits.shape)}")
    rule_positions = encoder_prefix_positions(ids_t, arch, n, pad)
    if not torch.equal(used_positions.expand(b, s), rule_positions):
        raise AssertionError(f"{name}: positions used {used_positions.tolist()} != the stated rule {rule_positions.tolist()}")
    if not torch.equal(left_padded_positions.expand(b, s), encoder_prefix_positions(lp_ids, arch, n, pad)):
        raise AssertionError(f"{name}: left-padded positions {left_padded_positions.tolist()} != the stated rule")

    def d_pos(pos):
        return float((run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t, past, position_ids=pos, **tt) - logits).abs().max())

    ar = torch.arange(s).expand(b, s).contiguous()
    real = (ids_t != pad).long()
    pos_checks = {"explicit position_ids = the stated rule (%s)" % ("n + arange(S)" if arch == "bert" else
                  "(cumsum(ids != pad) + n) * (ids != pad) + pad"): d_pos(rule_positions)}
    pos_wrong = {"arange(S) (no shift)": d_pos(ar)}
    if arch == "bert":
        pos_wrong["n + 1 + arange(S)"] = d_pos(ar + n + 1)
    else:
        pos_checks["n + pad + 1 + arange(S) (shifted, not padding-aware: differs only at the pad tokens, which are masked)"] = \
            d_pos(ar + n + pad + 1)
        pos_wrong["cumsum(ids != pad) * (ids != pad) + pad (padding-aware, not shifted by n)"] = d_pos(torch.cumsum(real, 1) * real + pad)
        pos_wrong["n + arange(S) (BERT's rule)"] = d_pos(ar + n)
    if max(max(pos_checks.values()), d_f32) > PREFIX_MAPPING_TOL or min(pos_wrong.values()) < 1e-3:
        raise AssertionError(f"{name}: position checks {pos_checks} / wrong {pos_wrong} / f32 mask {d_f32}")

    d_wrong = {k: float((run_with_prefix_past(fresh.model, fresh.config, ids_t, mask_t, w, **tt) - logits).abs().max())
               for k, w in wrong_layouts(saved["prompt_embeddings"].numpy(), n_layers, heads, head_dim, b).items()}
    if min(d_wrong.values()) < 1e-3:
        raise AssertionError(f"{name}: a wrong layout reproduces the logits: {d_wrong}")
    d_base = max_diff(out, base_out)
    plain_base = base_recording(arch)
    d_base_classifier = float((run_with_prefix_past(plain_base.model, plain_base.config, ids_t, mask_t, past, **tt) - logits).abs().max())
    if not all(torch.equal(plain_base.model.classifier.state_dict()[k], v) for k, v in base_classifier.items()):
        raise AssertionError(f"{name}: base classifier changed")
    if d_base < 1e-3 or d_base_classifier < 1e-3:
        raise AssertionError(f"{name}: prefix vs base {d_base:.3g}, saved vs base classifier {d_base_classifier:.3g}")

    # PEFT's own _prefix_tuning_forward, with the backbone's forward wrapped so that its signature check passes
    seen = []
    orig_forward = backbone.forward

    def shim(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
             past_key_values=None, **kw):
        seen.append({"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                     "position_ids": position_ids, "inputs_embeds": inputs_embeds, "past_key_values": past_key_values,
                     "past_seq_length": past_key_values.get_seq_length() if past_key_values is not None else None,
                     "past_layers": [(ly.keys[:, :, :n].clone(), ly.values[:, :, :n].clone()) for ly in past_key_values.layers]
                     if past_key_values is not None else None, **kw})
        return orig_forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, cache=past_key_values, **kw)

    backbone.forward = shim
    try:
        with torch.no_grad():
            shim_out = run_outputs(rec, model, feeds)
            shim_pos = model(input_ids=ids_t, attention_mask=mask_t, position_ids=ar, return_dict=True, **tt).logits
    finally:
        del backbone.forward
    d_shim = max_diff(shim_out, out)
    d_shim_pos = float((shim_pos - logits).abs().max())
    k1 = seen[0]
    if d_shim != 0.0:
        raise AssertionError(f"{name}: PEFT's forward through the shim differs from the reference by {d_shim:.3g}")
    if not (torch.equal(k1["input_ids"], ids_t) and k1["inputs_embeds"] is None and k1["position_ids"] is None):
        raise AssertionError(f"{name}: shim: input_ids / inputs_embeds / position_ids not as stated")
    if k1["attention_mask"].dtype != torch.float32 or not torch.equal(k1["attention_mask"], torch.cat((torch.ones(b, n), mask_t), 1)):
        raise AssertionError(f"{name}: shim: attention_mask != cat(ones(B, n), mask) float32")
    if tt and not torch.equal(k1["token_type_ids"], tt["token_type_ids"]) or not tt and k1["token_type_ids"] is not None:
        raise AssertionError(f"{name}: shim: token_type_ids not passed unchanged")
    if k1["past_seq_length"] != n or any(not (torch.equal(kk, torch.from_numpy(wk)) and torch.equal(vv, torch.from_numpy(wv)))
                                            for (kk, vv), (wk, wv) in zip(k1["past_layers"], past)):
        raise AssertionError(f"{name}: shim: PEFT's cache is not the formula past")
    if not torch.equal(seen[1]["position_ids"], ar + n):
        raise AssertionError(f"{name}: shim: given position_ids not offset by n")
    if arch == "bert" and d_shim_pos != 0.0:
        raise AssertionError(f"{name}: shim with position_ids=arange(S) (+n by PEFT) differs by {d_shim_pos:.3g}")

    G.write_npz(out_dir / "outputs.npz", out)
    G.write_npz(out_dir / "inputs.npz", feeds)

    # the saved files alone: fresh base + PeftModel.from_pretrained -> same table / classifier / cache / logits
    fresh2 = base_recording(arch)
    loaded = PeftModel.from_pretrained(fresh2.model, str(out_dir))
    loaded.eval()
    try:
        with torch.no_grad():
            run_outputs(fresh2, loaded, feeds)
        reload_refusal = None
    except ValueError as e:
        reload_refusal = str(e)
    with torch.no_grad():
        reload_past = loaded.get_prompt(b)
    d_reload_past = max(max(float((ly.keys - torch.from_numpy(k)).abs().max()), float((ly.values - torch.from_numpy(v)).abs().max()))
                        for ly, (k, v) in zip(reload_past.layers, past))
    ext = torch.cat((torch.ones(b, n, dtype=mask_t.dtype), mask_t), dim=1)
    with torch.no_grad():
        reload_logits = loaded.get_base_model()(input_ids=ids_t, attention_mask=ext, cache=reload_past, return_dict=True, **tt).logits
    d_reload = float((reload_logits - logits).abs().max())
    if reload_refusal != ENCODER_PREFIX_ERROR or d_reload_past != 0.0 or d_reload != 0.0:
        raise AssertionError(f"{name}: reloaded: refusal {reload_refusal!r}, get_prompt {d_reload_past:.3g}, logits {d_reload:.3g}")

    written = json.loads((out_dir / "adapter_config.json").read_text())
    pos_rule = ("position_ids = n + arange(S) for every token (pads included: BERT is not padding-aware)" if arch == "bert" else
                f"position_ids = (cumsum(input_ids != {pad}) + n) * (input_ids != {pad}) + {pad}: padding-aware and shifted by n "
                f"(real token j of an unpadded prefix at {pad} + 1 + n + j = {pad + 1 + n} + j; pad tokens at {pad})")
    return {
        "base_fixture": f"{arch}-legacy (same weights and inputs as {arch}-dynamo)",
        "base_model": f"base_recording('{arch}') ({type(fresh.model).__name__})",
        "inputs": f"inputs.npz (in this folder) = models/fixtures/{arch}-legacy/inputs.npz ({', '.join(sorted(feeds))}; "
        "the last example right-padded by 2)",
        "peft": {"class": type(model).__name__,
                 "config": f"PrefixTuningConfig(task_type='SEQ_CLS', num_virtual_tokens={n}, prefix_projection=False)"},
        "task_type": "SEQ_CLS",
        "num_virtual_tokens": n,
        "peft_forward_refuses": {
            "error": f"ValueError: {refusal}",
            "raised_by": "peft/peft_model.py PeftModelForSequenceClassification._prefix_tuning_forward (also after "
            "PeftModel.from_pretrained)",
            "why": f"'past_key_values' not in {type(fresh.model).__name__}.forward parameters {sig_model}, nor in the backbone "
            f"{type(backbone).__name__}.forward parameters {sig_backbone} (transformers {transformers.__version__} calls it `cache`)",
        },
        "outputs_npz": "NOT PEFT's output (its forward refuses): transformers' " + type(fresh.model).__name__ + " (fresh "
        "base_recording) with the classifier loaded from the saved base_model.classifier.*, cache = DynamicCache(formula past of "
        "the saved prompt_embeddings), attention_mask = cat(ones(B, n) int64, mask), input_ids unchanged"
        + (", token_type_ids unchanged" if tt else "") + ", no position_ids: logits [B, 2]",
        "adapter_config_prefix_fields": {k: written.get(k) for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim",
                                                                       "num_attention_heads", "num_layers", "num_transformer_submodules",
                                                                       "encoder_hidden_size", "prefix_projection", "inference_mode",
                                                                       "modules_to_save")},
        "model_heads": {"num_attention_heads": hf.num_attention_heads, "head_dim": head_dim, "hidden_size": hf.hidden_size},
        "token_dim": token_dim,
        "table": {"key": "prompt_embeddings", "shape": list(table.shape), "layout": f"[n={n}, L={n_layers} x 2 x H={heads} x hd={head_dim}]"},
        "table_to_past_formula": f"key_i[b, h, t, d] = prompt_embeddings[t, (2*i)*{token_dim} + h*{head_dim} + d]; "
        f"value_i[b, h, t, d] = prompt_embeddings[t, (2*i+1)*{token_dim} + h*{head_dim} + d]; past tensors [B, {heads}, {n}, {head_dim}]",
        "prefix_init": f"torch.manual_seed({init_seed}) then get_peft_model (PrefixEncoder nn.Embedding N(0, 1)), then embedding.weight <- "
        f"randn * {PREFIX_STD} from torch.Generator seeded {seed_of('prefix', arch)} (gen('prefix', '{arch}'))",
        "prefix_init_seed": init_seed,
        "prefix_table_std": float(table.std()),
        "modules_to_save_params_perturbed": [nm.replace(".default", "") for nm in mts],
        "modules_to_save_noise": f"randn * {MODULES_TO_SAVE_NOISE}, torch.Generator seeded {seed_of('prefix', arch, 'modules_to_save')}, sorted names",
        "base_output_shapes": {k: list(v.shape) for k, v in base_out.items()},
        "output_shapes": {k: list(v.shape) for k, v in out.items()},
        "positions": {
            "rule": pos_rule,
            "used_on_inputs_npz (position_embeddings input, forward hook)": used_positions.tolist(),
            "used_on_a_left_padded_probe (last example: 2 pads then its first S-2 tokens; not in outputs.npz)": {
                "input_ids": lp_ids.tolist(), "attention_mask": lp_mask.tolist(), "positions": left_padded_positions.tolist()},
            "max_abs_vs_outputs (same logits)": pos_checks,
            "max_abs_vs_outputs (wrong positions, negative controls)": pos_wrong,
        },
        "max_abs_prefix_vs_base": d_base,
        "max_abs_saved_vs_base_classifier (same prefix)": d_base_classifier,
        "max_abs_get_prompt_vs_formula": d_get_prompt,
        "max_abs_float32_mask_vs_outputs": d_f32,
        "max_abs_wrong_layouts_vs_outputs (negative controls)": d_wrong,
        "peft_forward_through_signature_shim": {
            "how": f"{model.transformer_backbone_name}.forward temporarily replaced by a function with a `past_key_values` "
            "parameter that calls the original forward with cache=past_key_values; then the recording's rec.run on the PeftModel",
            "max_abs_vs_outputs": d_shim,
            "kwargs_reaching_backbone": {k: ({"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} if torch.is_tensor(v)
                                             else type(v).__name__ if isinstance(v, transformers.Cache) else v)
                                         for k, v in sorted(k1.items()) if k not in ("past_layers", "past_seq_length")},
            "checked": "input_ids unchanged, inputs_embeds None, attention_mask = cat(ones(B, n), mask) float32, token_type_ids "
            + ("unchanged" if tt else "None") + ", position_ids None, past_key_values = DynamicCache whose first n positions equal "
            "the formula past (bit for bit)",
            "with_position_ids_arange_S": f"PEFT adds n (reach the backbone as n + arange(S)); max abs vs outputs {d_shim_pos!r}"
            + (" (= BERT's default positions)" if arch == "bert" else
               " (RoBERTa's own default is pad + 1 + n + j, padding-aware: explicit position ids through PEFT do not reproduce it)"),
        },
        "max_abs_reloaded_vs_outputs": {
            "get_prompt vs formula": d_reload_past,
            "loaded.get_base_model() (classifier = the loaded modules_to_save copy) with cache = loaded.get_prompt(B)": d_reload,
            "loaded PeftModel forward": f"refuses too: ValueError: {reload_refusal}",
        },
        "max_abs_output": max(float(np.max(np.abs(a))) for a in out.values()),
        "max_abs_base_output": max(float(np.max(np.abs(a))) for a in base_out.values()),
        "peft_treatment": ENCODER_PREFIX_TREATMENT,
        "tensors": safetensors_summary(out_dir / "adapter_model.safetensors"),
    }


# --------------------------------------------------------------------------------------
# 2. Training parity
# --------------------------------------------------------------------------------------

OPT = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
OPT_FLAGS = dict(amsgrad=False, maximize=False, foreach=False, capturable=False, differentiable=False, fused=False)
STEPS = 20
B_STD_TRAIN = 0.01

TRAIN = {
    "bert": dict(
        batch_size=4,
        n_examples=40,
        seq_len_range=(8, 12),
        lora=dict(task_type=None, r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0),
    ),
    "llama": dict(
        batch_size=2,
        n_examples=20,
        seq_len_range=(10, 10),
        lora=dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    ),
}


def make_bert_data(spec) -> list[dict]:
    """Sentence-pair-like examples: token_type 0 on the first part, 1 on the second,
    right padded (pad id 0, mask 0, token_type 0) to the batch's length L in [8, 12];
    the longest example of each batch has length L, the others L-4..L.
    label = 1 iff the second token is >= 64 (learnable, so the loss moves)."""
    g = gen("train", "bert", "data")
    bs, n = spec["batch_size"], spec["n_examples"]
    lo, hi = spec["seq_len_range"]
    rows = []
    for b in range(n // bs):
        L = int(torch.randint(lo, hi + 1, (1,), generator=g))
        lens = [L] + [int(torch.randint(L - 4, L + 1, (1,), generator=g)) for _ in range(bs - 1)]
        perm = torch.randperm(bs, generator=g).tolist()
        lens = [lens[i] for i in perm]
        for ln in lens:
            toks = torch.randint(3, G.VOCAB, (ln,), generator=g).tolist()
            toks[0] = 2  # a fixed "CLS"-like first token
            split = int(torch.randint(2, ln - 1, (1,), generator=g))
            tt = [0] * split + [1] * (ln - split)
            pad = L - ln
            rows.append(
                {
                    "input_ids": toks + [PAD_ID] * pad,
                    "attention_mask": [1] * ln + [0] * pad,
                    "token_type_ids": tt + [0] * pad,
                    "label": int(toks[1] >= 64),
                }
            )
    return rows


def make_llama_data(spec) -> list[dict]:
    """Right-padded to 10 tokens (pad id 0, mask 0, label -100); BOS (1) first; in each batch
    of 2 one example is full length and the other has length 5..9.  labels = input_ids on
    real tokens (HF shifts them inside the loss).  The text follows a noisy +1 pattern
    (next = prev + 1 mod 125, with random jumps) so that there is something to learn."""
    g = gen("train", "llama", "data")
    bs, n = spec["batch_size"], spec["n_examples"]
    L = spec["seq_len_range"][1]
    rows = []
    for b in range(n // bs):
        short = int(torch.randint(5, L, (1,), generator=g))
        lens = [L, short] if b % 2 == 0 else [short, L]
        for ln in lens:
            toks = [BOS_ID]
            cur = int(torch.randint(3, G.VOCAB, (1,), generator=g))
            for _ in range(ln - 1):
                toks.append(cur)
                jump = float(torch.rand(1, generator=g)) < 0.25
                cur = int(torch.randint(3, G.VOCAB, (1,), generator=g)) if jump else 3 + (cur - 3 + 1) % (G.VOCAB - 3)
            pad = L - ln
            rows.append(
                {
                    "input_ids": toks + [PAD_ID] * pad,
                    "attention_mask": [1] * ln + [0] * pad,
                    "labels": toks + [IGNORE_INDEX] * pad,
                }
            )
    return rows


def batch_tensors(rows: list[dict]) -> dict[str, torch.Tensor]:
    keys = [k for k in rows[0]]
    lens = {len(r["input_ids"]) for r in rows}
    assert len(lens) == 1, "every batch must be padded to one length"
    out = {k: torch.tensor([r[k] for r in rows], dtype=torch.int64) for k in keys}
    return out


def batches(rows: list[dict], bs: int) -> list[dict[str, torch.Tensor]]:
    return [batch_tensors(rows[i : i + bs]) for i in range(0, len(rows), bs)]


def bert_loss(model, b):
    logits = model(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"], return_dict=True
    ).logits
    return F.cross_entropy(logits, b["label"]), logits


def llama_loss(model, b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False, return_dict=True)
    # HF's ForCausalLMLoss == this explicit definition (shift by one, mean over labels != -100)
    logits = out.logits
    manual = F.cross_entropy(
        logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    d = abs(float(manual.detach()) - float(out.loss.detach()))
    LOSS_DEF_DIFF[0] = max(LOSS_DEF_DIFF[0], d)
    if d > 1e-6:
        raise AssertionError(f"HF causal LM loss {float(out.loss)} != explicit {float(manual)}")
    return out.loss, logits


LOSS_DEF_DIFF = [0.0]  # max |HF loss - explicit definition| seen


LOSS_FNS = {"bert": bert_loss, "llama": llama_loss}


def train_loop(arch: str, model, bl: list[dict[str, torch.Tensor]]) -> tuple[list[float], float]:
    """The recorded recipe.  Returns the per-step losses and min |grad lora_A| at step 1."""
    params = [p for _, p in lora_params(model)]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if trainable != [n for n, _ in lora_params(model)]:
        raise AssertionError(f"train-{arch}: trainable params are not exactly the LoRA tensors: {trainable}")
    opt = torch.optim.AdamW(params, **OPT, **OPT_FLAGS)
    losses, first_grad_A_norm = [], None
    for step in range(STEPS):
        b = bl[step % len(bl)]
        opt.zero_grad(set_to_none=True)
        loss, _ = LOSS_FNS[arch](model, b)
        loss.backward()
        if step == 0:
            first_grad_A_norm = min(float(p.grad.norm()) for n, p in lora_params(model) if ".lora_A." in n)
        losses.append(float(loss.detach()))
        opt.step()
    return losses, first_grad_A_norm


def llama_position_ids_check(rec: G.Recording, b: dict[str, torch.Tensor]) -> dict:
    """How position ids arise (neither graph nor torch takes them as input): compare torch with
    position_ids=None against explicit arange and against mask-derived cumsum positions, on the
    right-padded batch and on the same batch left-padded; and ORT (legacy) vs torch on the latter."""
    ids, mask = b["input_ids"], b["attention_mask"]
    lens = mask.sum(1)
    L = ids.shape[1]
    lids, lmask = torch.full_like(ids, PAD_ID), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(lens[i])
        lids[i, L - n :], lmask[i, L - n :] = ids[i, :n], 1
    res = {}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(FIXTURES_DIR / "llama-legacy" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    for side, (x, m) in {"right": (ids, mask), "left": (lids, lmask)}.items():
        with torch.no_grad():
            kw = dict(input_ids=x, attention_mask=m, use_cache=False)
            none = rec.model(**kw).logits
            ar = rec.model(**kw, position_ids=torch.arange(L).expand_as(x)).logits
            cs = rec.model(**kw, position_ids=(m.cumsum(1) - 1).clamp(min=0)).logits
        real = m.bool()
        ort_logits = torch.from_numpy(sess.run(["logits"], {"input_ids": x.numpy(), "attention_mask": m.numpy()})[0])
        res[side] = {
            "torch_default_vs_arange_positions": float((none - ar).abs().max()),
            "torch_default_vs_mask_cumsum_positions_on_real_tokens": float((none - cs)[real].abs().max()),
            "ort_legacy_vs_torch_default": float((ort_logits - none).abs().max()),
        }
    return res


def ort_vs_torch(arch: str, rec: G.Recording, bl: list[dict[str, torch.Tensor]]) -> dict:
    """Run both fixture ONNX graphs on every training batch; compare with the base torch model."""
    res = {}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    for exporter in G.EXPORTERS:
        sess = ort.InferenceSession(str(FIXTURES_DIR / f"{arch}-{exporter}" / "model.onnx"), so, providers=["CPUExecutionProvider"])
        worst = 0.0
        for b in bl:
            feeds = {t.onnx_name: b[t.onnx_name].numpy() for t in rec.inputs}
            ref = run_outputs(rec, rec.model, feeds)
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            worst = max(worst, max_diff(got, ref))
        if worst > ORT_TOL:
            raise AssertionError(f"train-{arch}: fixture {arch}-{exporter} (ORT) vs torch = {worst:.3g} > {ORT_TOL}")
        res[f"{arch}-{exporter}"] = worst
    return res


def record_train(arch: str, out_dir: Path) -> dict:
    spec = TRAIN[arch]
    rec = base_recording(arch)
    rows = make_bert_data(spec) if arch == "bert" else make_llama_data(spec)
    bl = batches(rows, spec["batch_size"])
    ort_check = ort_vs_torch(arch, rec, bl)
    pos_check = llama_position_ids_check(rec, bl[0]) if arch == "llama" else None
    LOSS_DEF_DIFF[0] = 0.0

    cfg = LoraConfig(**spec["lora"])  # init_lora_weights=True: A kaiming_uniform(a=sqrt(5)), B zeros
    a_seed = seed_of("train", arch, "lora_A")
    torch.manual_seed(a_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(rec.model, cfg)
    overwrite_lora_B(model, B_STD_TRAIN, gen("train", arch, "lora_B"))
    model.eval()  # dropout inactive everywhere (the HF configs keep their default dropout probs)

    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if trainable != [n for n, _ in lora_params(model)]:
        raise AssertionError(f"train-{arch}: trainable params are not exactly the LoRA tensors: {trainable}")
    frozen_numel = sum(p.numel() for p in model.parameters() if not p.requires_grad)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    with open(out_dir / "data.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    save_adapter(model, out_dir / "initial_adapter")
    check_saved_adapter(model, out_dir / "initial_adapter")

    params = [p for _, p in lora_params(model)]
    n_batches = len(bl)
    losses, first_grad_A_norm = train_loop(arch, model, bl)
    if first_grad_A_norm == 0.0:
        raise AssertionError(f"train-{arch}: a lora_A gradient is zero at step 1")

    with torch.no_grad():
        eval_loss = [float(LOSS_FNS[arch](model, b)[0]) for b in bl]
    save_adapter(model, out_dir / "final_adapter")
    check_saved_adapter(model, out_dir / "final_adapter")
    (out_dir / "losses.json").write_text(json.dumps(losses) + "\n")

    # replay: fresh base + initial_adapter/ from disk + the recipe gives the same run
    fresh = base_recording(arch)
    replay = PeftModel.from_pretrained(fresh.model, str(out_dir / "initial_adapter"), is_trainable=True)
    replay.eval()
    replay_losses, _ = train_loop(arch, replay, bl)
    final = safetensors.torch.load_file(str(out_dir / "final_adapter" / "adapter_model.safetensors"))
    replay_final = {n.replace(".default", ""): p.detach() for n, p in lora_params(replay)}
    replay_ok = replay_losses == losses and final.keys() == replay_final.keys() and all(
        torch.equal(final[k], replay_final[k]) for k in final
    )
    if not replay_ok:
        raise AssertionError(f"train-{arch}: replay from initial_adapter/ does not reproduce the run")

    trainable_info = {n.replace(".default", ""): list(p.shape) for n, p in lora_params(model)}
    if arch == "bert":
        data_desc = {
            "format": "seq-cls",
            "keys": ["input_ids", "attention_mask", "token_type_ids", "label"],
            "fixture_inputs": ["input_ids", "attention_mask", "token_type_ids"],
            "label_key": "label",
            "num_labels": 2,
        }
        loss_def = "F.cross_entropy(logits[batch, 2], label[batch]) with reduction='mean' (mean over the batch); logits from the model's own classifier head (graph output `logits`)"
        dropout = "model.eval() during training (HF config keeps hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, classifier_dropout=None, all inactive in eval mode); lora_dropout=0"
        trainable_note = "only the LoRA A/B tensors; task_type=None so PEFT adds no modules_to_save: the classifier (and everything else) is frozen"
    else:
        data_desc = {
            "format": "causal-lm",
            "keys": ["input_ids", "attention_mask", "labels"],
            "fixture_inputs": ["input_ids", "attention_mask"],
            "label_key": "labels",
            "label_ignore_index": IGNORE_INDEX,
            "labels_are": "unshifted (labels[t] = input_ids[t] on real tokens); the loss shifts them",
        }
        loss_def = (
            "HF ForCausalLMLoss (transformers 5.24.0): logits[:, :-1] vs labels[:, 1:], "
            "F.cross_entropy(ignore_index=-100, reduction='mean'), i.e. the mean over all "
            "(example, position) pairs whose shifted label != -100 in the whole batch (not per example)"
        )
        dropout = "model.eval() during training (LlamaConfig attention_dropout=0.0 anyway); lora_dropout=0"
        trainable_note = "only the LoRA A/B tensors (task_type=CAUSAL_LM adds no modules_to_save); embeddings, lm_head, norms frozen"

    recipe = {
        "base_model": {
            "fixtures": [f"{arch}-legacy", f"{arch}-dynamo"],
            "torch": f"generate.py REGISTRY['{arch}']() ({type(rec.model).__name__}, eval mode, float32)",
        },
        "task": "sequence-classification" if arch == "bert" else "causal-lm",
        "lora": {
            "r": spec["lora"]["r"],
            "lora_alpha": spec["lora"]["lora_alpha"],
            "scaling": spec["lora"]["lora_alpha"] / spec["lora"]["r"],
            "use_rslora": False,
            "target_modules": spec["lora"]["target_modules"],
            "lora_dropout": 0.0,
            "bias": "none",
            "peft_task_type": spec["lora"]["task_type"],
            "forward": "y = base(x) + scaling * (x @ A^T) @ B^T",
        },
        "init": {
            "lora_A": f"PEFT default (init_lora_weights=True: kaiming_uniform_(a=sqrt(5))) after torch.manual_seed({a_seed}); "
            "the exact values are in initial_adapter/",
            "lora_B": f"randn * {B_STD_TRAIN}, drawn in sorted parameter-name order from a torch.Generator; exact values in initial_adapter/",
        },
        "trainable": trainable_note,
        "trainable_tensors": trainable_info,
        "n_trainable": int(sum(p.numel() for p in params)),
        "n_frozen": int(frozen_numel),
        "optimizer": {
            "name": "torch.optim.AdamW",
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in OPT.items()},
            **OPT_FLAGS,
            "update": "t += 1; p -= lr*weight_decay*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
            "p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)  (decoupled weight decay applied to every LoRA tensor; m, v start at 0)",
        },
        "schedule": "constant lr, no warmup",
        "grad_clipping": None,
        "grad_accumulation": 1,
        "steps": STEPS,
        "batch_size": spec["batch_size"],
        "n_examples": len(rows),
        "epochs": STEPS * spec["batch_size"] / len(rows),
        "batch_of_step": f"step s (0-based) uses data.jsonl lines [B*(s mod {n_batches}), B*(s mod {n_batches})+B), B={spec['batch_size']}; no shuffling",
        "step_order": "zero_grad; loss = forward(batch); loss.backward(); record loss; optimizer.step()",
        "losses": "losses.json[s] = the loss of step s, computed before that step's optimizer update (float32 value as float64)",
        "loss": loss_def,
        "dropout": dropout,
        "padding": {
            "side": "right",
            "pad_id": PAD_ID,
            "padded_in_data": "every line is already padded to its batch's length; lengths differ between batches",
            "attention_mask": "1 = real token, 0 = pad",
        },
        "seq_len_per_batch": [int(b["input_ids"].shape[1]) for b in bl],
        "data": data_desc,
        "seeds": {"ref_seed": REF_SEED, "lora_A_torch_manual_seed": a_seed, "fixture_model_seed": G.SEED},
        "dtype": "float32",
        "determinism": "torch.set_num_threads(1), torch.use_deterministic_algorithms(True), CPU",
    }
    if arch == "llama":
        recipe["position_ids"] = (
            "not an input: the fixture graph and HF LlamaModel both use position_ids = arange(sequence) "
            "for every row (independent of attention_mask); with right padding real tokens get 0..len-1"
        )
        recipe["padding"]["label_at_pad"] = IGNORE_INDEX
    if arch == "bert":
        recipe["padding"]["token_type_id_at_pad"] = 0
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return {
        "ort_vs_torch_on_training_batches": ort_check,
        "llama_position_ids": pos_check,
        "max_abs_hf_loss_vs_explicit_definition": LOSS_DEF_DIFF[0] if arch == "llama" else None,
        "replay_from_initial_adapter_bit_identical": replay_ok,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "mean_loss_over_batches_after_training": float(np.mean(eval_loss)),
        "min_lora_A_grad_norm_step1": first_grad_A_norm,
        "seq_len_per_batch": recipe["seq_len_per_batch"],
        "tensors": safetensors_summary(out_dir / "final_adapter" / "adapter_model.safetensors"),
    }


# --------------------------------------------------------------------------------------
# 3. AdaLoRA training (PEFT's own AdaLoraModel: orthogonal regularizer, RankAllocator)
# --------------------------------------------------------------------------------------

ADALORA_STEPS = 24
ADALORA = dict(
    init_r=6,
    target_r=3,
    tinit=4,
    tfinal=6,
    deltaT=2,
    beta1=0.85,
    beta2=0.85,
    orth_reg_weight=0.5,
    lora_alpha=8,
    lora_dropout=0.0,
    total_step=ADALORA_STEPS,
)
ADALORA_TASK = {
    "bert": dict(task_type=None, target_modules=["query", "value"]),
    "llama": dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]),
}
E_STD_ADALORA = 0.01
ADALORA_LOSS_TOL = 1e-6  # outputs.loss - orth_reg_weight * regularizer vs the task loss
ADALORA_KINDS = (".lora_A.", ".lora_B.", ".lora_E.")


def adalora_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    """lora_A / lora_B / lora_E of every SVD layer, sorted by name (ranknum excluded)."""
    return sorted(((n, p) for n, p in model.named_parameters() if any(k in n for k in ADALORA_KINDS)), key=lambda x: x[0])


def module_label(n: str) -> str:
    """'base_model.model.X.lora_E.default' / 'X.lora_E.default' / 'X.lora_E' -> 'X'."""
    n = n.removeprefix("base_model.model.").replace(".default", "")
    for t in (".lora_A", ".lora_B", ".lora_E"):
        if n.endswith(t):
            return n[: -len(t)]
    raise ValueError(n)


def adalora_tensors(model) -> dict[str, torch.Tensor]:
    """{'<module>.lora_A|lora_B|lora_E': tensor} in PEFT's shapes, full rank."""
    return {f"{module_label(n)}.{n.split('.')[-2]}": p.detach().clone() for n, p in adalora_params(model)}


def adalora_modules(model) -> list[str]:
    return sorted({module_label(n) for n, _ in adalora_params(model)})


def orth_regularizer(hf_model) -> torch.Tensor:
    """AdaLoraModel.forward's regularizer, unweighted, recomputed the same way (same order):
    mean over every lora_A (A A^T) and lora_B (B^T B) of ||cov - I||_F."""
    reg, num = 0, 0
    for n, p in hf_model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and "default" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            reg = reg + torch.norm(cov - torch.eye(*cov.size(), dtype=cov.dtype), p="fro")
            num += 1
    return reg / num


def triplet_scores(ra, modules: list[str]) -> dict[str, torch.Tensor]:
    """RankAllocator.mask_to_budget's per-triplet score, recomputed from its EMA state:
    s(P) = exp_avg_ipt(P) * exp_avg_unc(P) elementwise; score_i = s(E)_i + (mean_j s(A)_ij + mean_o s(B)_oi)."""
    out = {}
    for m in modules:
        s = {k: ra.exp_avg_ipt[f"{m}.{k}.default"] * ra.exp_avg_unc[f"{m}.{k}.default"] for k in ("lora_A", "lora_B", "lora_E")}
        a = torch.mean(s["lora_A"], dim=1, keepdim=True)
        b = torch.mean(s["lora_B"], dim=0, keepdim=False).view(-1, 1)
        out[m] = s["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)
    return out


def adalora_forward(arch: str, model, b: dict[str, torch.Tensor], reg_weight: float, stats: dict):
    """One training forward through PEFT's AdaLoraModel.forward (which adds
    orth_reg_weight * regularizer to outputs.loss).  Returns (loss, task_loss, reg)."""
    hf = model.base_model.model
    if arch == "bert":
        # task_type=None: PeftModel.forward calls the HF model directly (skipping
        # AdaLoraModel.forward, so no regularizer); PEFT's task wrappers
        # (PeftModelForSequenceClassification, ...ForCausalLM) call model.base_model(...),
        # so do the same here.
        out = model.base_model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
            labels=b["label"],
            return_dict=True,
        )
        task = F.cross_entropy(out.logits, b["label"])
    else:
        # PeftModelForCausalLM.forward -> AdaLoraModel.forward -> LlamaForCausalLM(labels=...)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False, return_dict=True)
        logits = out.logits
        task = hf.loss_function(logits=logits, labels=b["labels"], vocab_size=hf.config.vocab_size)
        manual = F.cross_entropy(
            logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        d = abs(float(manual.detach()) - float(task.detach()))
        stats["max_abs_hf_loss_vs_explicit_definition"] = max(stats.get("max_abs_hf_loss_vs_explicit_definition", 0.0), d)
        if d > ADALORA_LOSS_TOL:
            raise AssertionError(f"adalora-{arch}: HF causal LM loss {float(task)} != explicit {float(manual)}")
    with torch.no_grad():
        reg = orth_regularizer(hf)
    d = abs(float(out.loss.detach()) - (float(task.detach()) + reg_weight * float(reg)))
    stats["max_abs_loss_minus_task_minus_weighted_reg"] = max(stats.get("max_abs_loss_minus_task_minus_weighted_reg", 0.0), d)
    if d > ADALORA_LOSS_TOL:
        raise AssertionError(f"adalora-{arch}: outputs.loss {float(out.loss)} != task {float(task)} + {reg_weight} * reg {float(reg)}")
    return out.loss, task, reg


def kept_from_E(model) -> dict[str, list[bool]]:
    return {module_label(n): (p.detach().view(-1) != 0).tolist() for n, p in adalora_params(model) if ".lora_E." in n}


def adalora_loop(arch: str, model, bl: list[dict[str, torch.Tensor]]) -> dict:
    """The recorded AdaLoRA recipe.  Returns losses, schedule, check figures."""
    params = adalora_params(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if trainable != [n for n, _ in params]:
        raise AssertionError(f"adalora-{arch}: trainable params are not exactly lora_A/B/E: {trainable}")
    cfg = model.peft_config["default"]
    ra = model.base_model.rankallocator
    modules = adalora_modules(model)
    final_step = cfg.total_step - cfg.tfinal
    opt = torch.optim.AdamW([p for _, p in params], **OPT, **OPT_FLAGS)
    res = {"loss": [], "task_loss": [], "orth_reg": [], "schedule": [], "stats": {}}
    for step in range(ADALORA_STEPS):
        b = bl[step % len(bl)]
        opt.zero_grad(set_to_none=True)
        loss, task, reg = adalora_forward(arch, model, b, cfg.orth_reg_weight, res["stats"])
        loss.backward()
        if step == 0:
            res["stats"]["min_grad_norm_step1"] = {
                k: min(float(p.grad.norm()) for n, p in params if k in n) for k in ADALORA_KINDS
            }
        res["loss"].append(float(loss.detach()))
        res["task_loss"].append(float(task.detach()))
        res["orth_reg"].append(float(reg))
        opt.step()

        budget, mask_ind = ra.budget_schedule(step)
        # scores the allocator masks by: at the final allocation (step == total_step - tfinal)
        # update_ipt is skipped and reset_ipt runs afterwards, so read them before the call
        scores = triplet_scores(ra, modules) if step == final_step else None
        before = cfg.rank_pattern
        model.base_model.update_and_allocate(step)
        new_pattern = cfg.rank_pattern is not before
        if step < final_step:
            kind = "mask_to_budget" if mask_ind else "none"
            if mask_ind:
                scores = triplet_scores(ra, modules)
        elif step == final_step:
            kind = "mask_to_budget_final"
        else:
            kind = "mask_using_rank_pattern"
        masked = kind != "none"
        if new_pattern != kind.startswith("mask_to_budget"):
            raise AssertionError(f"adalora-{arch}: step {step}: rank_pattern set={new_pattern} but kind={kind}")
        entry = {"step": step, "budget": int(budget), "mask_step": masked, "kind": kind, "kept": None}
        if masked:
            from_e = kept_from_E(model)
            from_rp = {module_label(k): [bool(x) for x in v] for k, v in cfg.rank_pattern.items()}
            if from_e != from_rp:
                raise AssertionError(f"adalora-{arch}: step {step}: E zeros {from_e} != rank_pattern {from_rp}")
            entry["kept"] = dict(sorted(from_rp.items()))
            entry["n_kept"] = sum(sum(v) for v in from_rp.values())
        if scores is not None:
            k = ra.init_bgt - budget
            allsc = torch.cat([scores[m] for m in modules])
            thr = torch.kthvalue(allsc, k=k)[0].item()
            mine = {m: (~(scores[m] <= thr)).tolist() for m in modules}
            if mine != entry["kept"]:
                raise AssertionError(f"adalora-{arch}: step {step}: recomputed mask {mine} != PEFT's {entry['kept']}")
            entry["k_masked"] = int(k)
            entry["threshold"] = thr
            entry["score"] = {m: scores[m].tolist() for m in modules}
            srt = sorted(allsc.tolist())
            entry["score_gap_at_threshold"] = srt[k] - srt[k - 1]  # margin between last masked and first kept
            entry["relative_score_gap_at_threshold"] = (srt[k] - srt[k - 1]) / srt[k]
        entry["zero_E_entries_after_step"] = int(sum(int((p == 0).sum()) for n, p in params if ".lora_E." in n))
        res["schedule"].append(entry)
    return res


def record_adalora(arch: str, out_dir: Path) -> dict:
    spec = TRAIN[arch]
    rec = base_recording(arch)
    rows = make_bert_data(spec) if arch == "bert" else make_llama_data(spec)
    bl = batches(rows, spec["batch_size"])
    n_batches = len(bl)

    cfg = peft.AdaLoraConfig(**ADALORA_TASK[arch], **ADALORA)
    init_seed = seed_of("adalora", arch, "init")
    torch.manual_seed(init_seed)  # PEFT's init (E zeros, A/B normal(0, 0.02)) draws from the global RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(rec.model, cfg)
    with torch.no_grad():
        g = gen("adalora", arch, "lora_E")
        for n, p in adalora_params(model):
            if ".lora_E." in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * E_STD_ADALORA)
    model.eval()  # dropout inactive everywhere
    modules = adalora_modules(model)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}
    ranknum0 = {k: float(m.ranknum["default"]) for k, m in layers.items()}
    if set(ranknum0.values()) != {float(ADALORA["init_r"])}:
        raise AssertionError(f"adalora-{arch}: ranknum {ranknum0}")
    ra = model.base_model.rankallocator
    budgets = [ra.budget_schedule(s) for s in range(ADALORA_STEPS)]
    if len({b for b, _ in budgets}) < 3 or ra.init_bgt == ra.target_bgt:
        raise AssertionError(f"adalora-{arch}: the budget does not change inside the run: {budgets}")

    # with task_type=None, PeftModel.forward skips AdaLoraModel.forward: no regularizer added
    with torch.no_grad():
        b0 = bl[0]
        if arch == "bert":
            kw = dict(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"], token_type_ids=b0["token_type_ids"], labels=b0["label"])
            plain = model(**kw, return_dict=True).loss
            via_base = model.base_model(**kw, return_dict=True).loss
        else:
            kw = dict(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"], labels=b0["labels"], use_cache=False)
            plain = model(**kw, return_dict=True).loss
            via_base = model.base_model(**kw, return_dict=True).loss
        reg0 = float(orth_regularizer(model.base_model.model))
    # PeftModel's own forward adds the regularizer iff it goes through AdaLoraModel.forward
    peft_model_forward_adds_reg = float(plain) == float(via_base)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    data_text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
    (out_dir / "data.jsonl").write_text(data_text)
    train_data = out_dir.parent / f"train-{arch}" / "data.jsonl"
    data_same_as_train = train_data.read_text() == data_text if train_data.exists() else None
    if data_same_as_train is False:
        raise AssertionError(f"adalora-{arch}: data.jsonl differs from {train_data}")
    initial = adalora_tensors(model)
    save_adapter(model, out_dir / "initial_adapter")
    saved0 = safetensors.torch.load_file(str(out_dir / "initial_adapter" / "adapter_model.safetensors"))
    want0 = {f"base_model.model.{k}": v for k, v in initial.items()}
    if saved0.keys() != want0.keys() or not all(torch.equal(saved0[k], want0[k]) for k in want0):
        raise AssertionError(f"adalora-{arch}: initial_adapter/ != the live tensors: {sorted(saved0)[:3]}")

    run = adalora_loop(arch, model, bl)
    final = adalora_tensors(model)
    safetensors.torch.save_file({k: final[k].contiguous() for k in sorted(final)}, str(out_dir / "final_full.safetensors"))
    final_pattern = {module_label(k): [bool(x) for x in v] for k, v in model.peft_config["default"].rank_pattern.items()}
    save_adapter(model, out_dir / "final_adapter")
    written_cfg = json.loads((out_dir / "final_adapter" / "adapter_config.json").read_text())
    # PEFT's save truncates every tensor to the kept ranks of the final rank_pattern
    saved = safetensors.torch.load_file(str(out_dir / "final_adapter" / "adapter_model.safetensors"))
    for m in modules:
        keep = torch.tensor(final_pattern[m])
        want = {
            "lora_A": final[f"{m}.lora_A"][keep],
            "lora_B": final[f"{m}.lora_B"][:, keep],
            "lora_E": final[f"{m}.lora_E"][keep],
        }
        for k, v in want.items():
            if not torch.equal(saved[f"base_model.model.{m}.{k}"], v):
                raise AssertionError(f"adalora-{arch}: final_adapter {m}.{k} != final_full truncated by the rank pattern")
    if len(saved) != 3 * len(modules):
        raise AssertionError(f"adalora-{arch}: final_adapter holds {sorted(saved)}")
    (out_dir / "losses.json").write_text(json.dumps({"loss": run["loss"], "task_loss": run["task_loss"], "orth_reg": run["orth_reg"]}) + "\n")
    (out_dir / "schedule.json").write_text(json.dumps(run["schedule"], indent=1) + "\n")

    # replay: fresh base + initial_adapter/ from disk + the recipe gives the same run
    fresh = base_recording(arch)
    replay = PeftModel.from_pretrained(fresh.model, str(out_dir / "initial_adapter"), is_trainable=True)
    replay.eval()
    replay_init = adalora_tensors(replay)
    replay_init_same = replay_init.keys() == initial.keys() and all(torch.equal(replay_init[k], initial[k]) for k in initial)
    replay_run = adalora_loop(arch, replay, bl)
    replay_final = adalora_tensors(replay)
    replay_diff = {
        "initial_tensors_identical": replay_init_same,
        "loss_identical": replay_run["loss"] == run["loss"],
        "task_loss_identical": replay_run["task_loss"] == run["task_loss"],
        "orth_reg_identical": replay_run["orth_reg"] == run["orth_reg"],
        "schedule_identical": replay_run["schedule"] == run["schedule"],
        "final_tensors_identical": replay_final.keys() == final.keys() and all(torch.equal(replay_final[k], final[k]) for k in final),
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(replay_run["loss"], run["loss"])),
        "max_abs_final_tensor_diff": max(float((replay_final[k] - final[k]).abs().max()) for k in final),
    }
    replay_ok = all(v for k, v in replay_diff.items() if k.endswith("identical"))
    if not replay_ok:
        raise AssertionError(f"adalora-{arch}: replay from initial_adapter/ does not reproduce the run: {replay_diff}")

    # outputs of the trained (unmerged) model, of final_adapter/ reloaded, and merged
    feeds = fixture_arrays(arch, "legacy", "inputs")
    out = run_outputs(rec, model, feeds)
    fresh2 = base_recording(arch)
    with warnings.catch_warnings():
        # LoraModel's injection reads AdaLoRA's rank_pattern ('<module>.lora_E': [bool]) as LoRA's
        # per-module rank override, matches no module and warns; AdaLoRA then resizes the modules itself
        warnings.simplefilter("ignore", RuntimeWarning)
        loaded = PeftModel.from_pretrained(fresh2.model, str(out_dir / "final_adapter"))
    loaded.eval()
    loaded_layers = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules() if isinstance(m, AdaLoraLayer)}
    reload_info = {
        "r": {k: m.r["default"] for k, m in sorted(loaded_layers.items())},
        "ranknum": {k: float(m.ranknum["default"]) for k, m in sorted(loaded_layers.items())},
        "max_abs_outputs_vs_outputs_final": max_diff(run_outputs(fresh2, loaded, feeds), out),
    }
    if set(reload_info["ranknum"].values()) != {float(ADALORA["init_r"])}:
        raise AssertionError(f"adalora-{arch}: reloaded ranknum {reload_info['ranknum']}")
    if reload_info["max_abs_outputs_vs_outputs_final"] > MERGE_TOL:
        raise AssertionError(f"adalora-{arch}: final_adapter/ reloaded differs from outputs_final by {reload_info}")
    merged = model.merge_and_unload()
    merged.eval()
    merged_out = run_outputs(rec, merged, feeds)
    d_merge = max_diff(out, merged_out)
    if d_merge > MERGE_TOL:
        raise AssertionError(f"adalora-{arch}: unmerged vs merged differ by {d_merge:.3g}")
    G.write_npz(out_dir / "outputs_final.npz", out)
    G.write_npz(out_dir / "merged_outputs_final.npz", merged_out)
    plain_base = base_recording(arch)
    d_base = max_diff(out, run_outputs(plain_base, plain_base.model, feeds))

    sched = run["schedule"]
    recipe = adalora_recipe(arch, rec, rows, bl, init_seed, run, layers, modules)
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return {
        "peft_model_forward_adds_regularizer_with_this_task_type": peft_model_forward_adds_reg,
        "regularizer_check_step0": {"PeftModel_forward_loss": float(plain), "AdaLoraModel_forward_loss": float(via_base), "orth_reg": reg0},
        "data_identical_to_train_recording": data_same_as_train,
        "max_abs_loss_minus_task_minus_weighted_reg": run["stats"]["max_abs_loss_minus_task_minus_weighted_reg"],
        "max_abs_hf_loss_vs_explicit_definition": run["stats"].get("max_abs_hf_loss_vs_explicit_definition"),
        "min_grad_norm_step1": {k.strip("."): v for k, v in run["stats"]["min_grad_norm_step1"].items()},
        "init_bgt": int(ra.init_bgt),
        "target_bgt": int(ra.target_bgt),
        "budget_per_step": [e["budget"] for e in sched],
        "mask_steps": {e["kind"]: [x["step"] for x in sched if x["kind"] == e["kind"]] for e in sched if e["mask_step"]},
        "n_kept_per_mask_step": {str(e["step"]): e["n_kept"] for e in sched if e["mask_step"]},
        "final_rank_pattern": final_pattern,
        "final_adapter_config_rank_pattern": written_cfg.get("rank_pattern"),
        "final_adapter_config": {k: written_cfg.get(k) for k in ("peft_type", "task_type", "init_r", "target_r", "r", "lora_alpha", "total_step", "target_modules")},
        "final_adapter_reloaded": reload_info,
        "replay_from_initial_adapter": replay_diff,
        "replay_from_initial_adapter_bit_identical": replay_ok,
        "first_loss": run["loss"][0],
        "last_loss": run["loss"][-1],
        "first_task_loss": run["task_loss"][0],
        "last_task_loss": run["task_loss"][-1],
        "max_abs_unmerged_vs_merged": d_merge,
        "max_abs_trained_vs_base_outputs": d_base,
        "tensors": safetensors_summary(out_dir / "final_adapter" / "adapter_model.safetensors"),
        "initial_tensors": safetensors_summary(out_dir / "initial_adapter" / "adapter_model.safetensors"),
    }


def adalora_recipe(arch, rec, rows, bl, init_seed, run, layers, modules) -> dict:
    spec = TRAIN[arch]
    c = ADALORA
    n_mod = len(modules)
    init_bgt, target_bgt = c["init_r"] * n_mod, c["target_r"] * n_mod
    final_step = c["total_step"] - c["tfinal"]
    n_batches = len(bl)
    shapes = {k: list(v) for k, v in adalora_tensors_shapes(layers).items()}
    if arch == "bert":
        forward_call = (
            "model.base_model(input_ids, attention_mask, token_type_ids, labels=label) i.e. AdaLoraModel.forward "
            "(with task_type=None, PeftModel.forward would call the HF model directly and add no regularizer; "
            "PEFT's task wrappers PeftModelForSequenceClassification/ForCausalLM call model.base_model(...) like this)"
        )
        task_loss = "F.cross_entropy(logits[batch, 2], label[batch]), mean over the batch (= BertForSequenceClassification's loss with labels, single_label_classification)"
        trainable_note = "only lora_A/lora_B/lora_E; task_type=None so PeftModel adds no modules_to_save: the classifier (and everything else) is frozen"
    else:
        forward_call = "model(input_ids, attention_mask, labels=labels, use_cache=False): PeftModelForCausalLM.forward -> AdaLoraModel.forward -> LlamaForCausalLM"
        task_loss = (
            "HF ForCausalLMLoss (transformers 5.24.0): logits[:, :-1] vs labels[:, 1:], F.cross_entropy(ignore_index=-100, reduction='mean'), "
            "the mean over all (example, position) pairs of the batch whose shifted label != -100"
        )
        trainable_note = "only lora_A/lora_B/lora_E (task_type=CAUSAL_LM adds no modules_to_save); embeddings, lm_head, norms frozen"
    return {
        "base_model": {
            "fixtures": [f"{arch}-legacy", f"{arch}-dynamo"],
            "torch": f"generate.py REGISTRY['{arch}']() ({type(rec.model).__name__}, eval mode, float32)",
        },
        "task": "sequence-classification" if arch == "bert" else "causal-lm",
        "data": f"data.jsonl: the same lines as train-{arch}/data.jsonl (same format, see that recording's recipe.json)",
        "peft": {"version": peft.__version__, "class": "peft.AdaLoraConfig -> AdaLoraModel with SVDLinear layers"},
        "adalora_config": {**c, **ADALORA_TASK[arch], "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False},
        "modules": modules,
        "n_modules": n_mod,
        "tensor_shapes": {
            "lora_A": "[r, in_features] (right singular vectors, rows = ranks)",
            "lora_E": "[r, 1] (singular values)",
            "lora_B": "[out_features, r] (left singular vectors, columns = ranks)",
            "per_module": shapes,
            "r": c["init_r"],
        },
        "forward": {
            "formula": "y = base(x) + ((dropout(x) @ (A * E)^T @ B^T) * lora_alpha) / (ranknum + 1e-5)",
            "evaluation_order": "t = (A * E) (E [r,1] broadcast over A's columns, i.e. row i of A times E[i]); u = x @ t^T; v = u @ B^T; "
            "v = v * lora_alpha (Python int 8); v = v / (ranknum + 1e-5) (ranknum a float32 tensor of shape [1]); result += v",
            "lora_alpha": c["lora_alpha"],
            "scaling": "lora_alpha (self.scaling = lora_alpha when lora_alpha > 0), then divided by (ranknum + 1e-5)",
            "ranknum": f"float32 [1], filled with float(init_r) = {float(c['init_r'])} at creation; never changed by masking (masked ranks only get E = 0); "
            "not saved in the adapter file; after PeftModel.from_pretrained of a truncated adapter, resize_modules_by_rank_pattern restores the old "
            f"ranknum (init_r = {c['init_r']}), so the effective scale stays lora_alpha / (init_r + 1e-5) = {c['lora_alpha'] / (c['init_r'] + 1e-5)!r} "
            "(not lora_alpha / kept_rank)",
            "effective_scale_float64": c["lora_alpha"] / (c["init_r"] + 1e-5),
            "merged_delta_weight": "W += (B @ (A * E)) * lora_alpha / (ranknum + 1e-5)  (W [out, in]; get_delta_weight)",
            "dropout": "lora_dropout=0 -> nn.Identity",
        },
        "init": {
            "peft_default": f"torch.manual_seed({init_seed}) then get_peft_model; per SVDLinear (in injection order) update_layer draws from the "
            "global RNG: randn lora_A, randn lora_E, randn lora_B, randn(1) for ranknum (then filled with init_r), and reset_lora_parameters: "
            "E zeros, normal_(A, 0, 0.02), normal_(B, 0, 0.02)",
            "lora_E_overwrite": f"every lora_E <- randn(r, 1) * {E_STD_ADALORA} from torch.Generator seeded {seed_of('adalora', arch, 'lora_E')}, "
            "in sorted parameter-name order (so A and B get non-zero gradients at step 1)",
            "exact_values": "initial_adapter/adapter_model.safetensors (rank_pattern null there, so full rank r = init_r)",
        },
        "trainable": trainable_note,
        "n_trainable": int(sum(int(np.prod(s)) for s in shapes.values())),
        "regularizer": {
            "definition": "R = (1/N) * sum over P in {every lora_A, every lora_B of the adapter} of ||C(P) - I_r||_F, "
            "C(A) = A @ A^T ([r, r]), C(B) = B^T @ B ([r, r]), torch.norm(p='fro')",
            "N": 2 * n_mod,
            "includes_masked_ranks": "yes: all r = init_r rows/columns enter C, masking only zeroes E",
            "E_excluded": True,
            "sum_order": "model.named_parameters() order (layer by layer, module order; A before B within a module); sum starts from Python 0",
            "total_loss": f"outputs.loss = task_loss + orth_reg_weight * R, orth_reg_weight = {c['orth_reg_weight']} (added in place in AdaLoraModel.forward)",
            "gradient": "flows through R into every lora_A and lora_B",
        },
        "forward_call": forward_call,
        "task_loss": task_loss,
        "losses_json": "loss[s] = outputs.loss of step s (task + 0.5*R), task_loss[s], orth_reg[s] = R (unweighted); all computed in the forward of step s, "
        "before that step's optimizer update; float32 values written as JSON float64",
        "optimizer": {
            "name": "torch.optim.AdamW",
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in OPT.items()},
            **OPT_FLAGS,
            "params": "every lora_A, lora_B, lora_E (sorted by parameter name), one param group",
            "update": "t += 1; p -= lr*weight_decay*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
            "p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)  (decoupled weight decay on every tensor incl. E; m, v start at 0)",
            "state_and_masking": "masking only overwrites E entries in place; AdamW's m/v of E are not touched, so a masked E entry becomes "
            "non-zero again at the next optimizer.step (its gradient and momentum are non-zero) unless it is masked again",
        },
        "lr_schedule": "constant lr, no warmup",
        "grad_clipping": None,
        "grad_accumulation": 1,
        "steps": ADALORA_STEPS,
        "batch_size": spec["batch_size"],
        "batch_of_step": f"step s (0-based) uses data.jsonl lines [B*(s mod {n_batches}), B*(s mod {n_batches})+B), B={spec['batch_size']}; no shuffling",
        "step_order": "for s in 0..23: optimizer.zero_grad(set_to_none=True); out = forward(batch(s), labels); out.loss.backward(); "
        "record losses; optimizer.step(); model.base_model.update_and_allocate(s)",
        "step_numbering": "0-based: the global_step passed to update_and_allocate is s = 0..23 (the same s as the losses.json index and schedule.json step)",
        "update_and_allocate": {
            "s < total_step - tfinal (= %d)" % final_step: "RankAllocator.update_ipt, then (budget, mask_ind) = budget_schedule(s); if mask_ind: "
            "rank_pattern = mask_to_budget(budget) (E masked in place), stored in config.rank_pattern",
            "s == total_step - tfinal": "NO update_ipt; budget_schedule(s) gives the target budget; mask_to_budget(budget) (force_mask); "
            "config.rank_pattern = it; reset_ipt() (the EMAs are discarded)",
            "s > total_step - tfinal": "mask_using_rank_pattern(config.rank_pattern): E entries of the final pattern's dropped ranks re-zeroed after every step; "
            "no importance update, no new pattern",
        },
        "importance": {
            "ipt": "for every P in lora_A, lora_B, lora_E (elementwise): ipt(P) = |P_after_step * grad_P| where P_after_step is the value after "
            "this step's optimizer.step() and grad_P the gradient of this step's backward (computed before the step)",
            "ema": f"I(P) = beta1*I(P) + (1-beta1)*ipt(P); U(P) = beta2*U(P) + (1-beta2)*|ipt(P) - I(P)| (U uses the already updated I); "
            f"beta1 = {c['beta1']}, beta2 = {c['beta2']}; I, U start at zeros at the first update (step 0); beta and 1-beta are Python floats times float32 tensors",
            "element_score": "S(P) = I(P) * U(P) elementwise",
            "triplet_score": "for rank i of a module: score_i = S(E)[i, 0] + ( mean_j S(A)[i, j] + mean_o S(B)[o, i] ) "
            "(torch.mean over A's in_features and over B's out_features; the two means are added first, then added to S(E))",
        },
        "budget_schedule": {
            "init_bgt": f"sum of r over modules = init_r * n_modules = {init_bgt}",
            "target_bgt": f"target_r * n_modules = {target_bgt}",
            "rule": "s <= tinit: (init_bgt, no mask); s > total_step - tfinal: (target_bgt, mask); otherwise "
            "mul = 1 - (s - tinit) / (total_step - tfinal - tinit); budget = int((init_bgt - target_bgt) * mul**3 + target_bgt) "
            "(Python float arithmetic, int() truncates), mask iff s % deltaT == 0",
            "budget_per_step": [e["budget"] for e in run["schedule"]],
        },
        "masking_rule": "k = init_bgt - budget; threshold = torch.kthvalue(cat(all modules' triplet scores), k).value (the k-th smallest over all "
        "n_modules * init_r scores); every rank with score <= threshold is masked: E[i] = 0 (masked_fill_), A, B untouched; "
        "rank_pattern[module] = [score_i > threshold for i in ranks] (ties at the threshold would mask more than k)",
        "schedule_json": "one entry per step: step, budget = budget_schedule(step)[0], mask_step (E masked after that step's update), "
        "kind (none | mask_to_budget | mask_to_budget_final | mask_using_rank_pattern), kept = {module: [bool per rank]} after masking "
        "(from E != 0, asserted equal to PEFT's rank_pattern), n_kept; at mask_to_budget steps also k_masked, threshold, score (the "
        "triplet scores, recomputed from the allocator state and checked to give PEFT's mask) and score_gap_at_threshold; "
        "zero_E_entries_after_step (0 between mask steps where masked entries have been revived by AdamW)",
        "final_full_safetensors": "every lora_A/lora_B/lora_E after step 24 (after the last update_and_allocate), full rank r = init_r, "
        "masked ranks have E = 0 (A/B rows/cols of masked ranks are kept and keep training); keys '<module>.lora_A|lora_B|lora_E'",
        "final_adapter": "PeftModel.save_pretrained after training: the saved config's rank_pattern is the final pattern (keys "
        "'<module>.lora_E', adapter name removed), and each tensor is truncated to the kept ranks (A rows, E rows, B columns); "
        "ranknum is not saved; reloading restores ranknum = init_r",
        "seeds": {
            "ref_seed": REF_SEED,
            "peft_init_torch_manual_seed": init_seed,
            "lora_E_generator_seed": seed_of("adalora", arch, "lora_E"),
            "fixture_model_seed": G.SEED,
        },
        "dtype": "float32",
        "determinism": "torch.set_num_threads(1), torch.use_deterministic_algorithms(True), CPU",
        "dropout": "model.eval() during training (base model dropout inactive); lora_dropout=0",
    }


def adalora_tensors_shapes(layers) -> dict[str, torch.Size]:
    out = {}
    for m, layer in sorted(layers.items()):
        for k in ("lora_A", "lora_B", "lora_E"):
            out[f"{m}.{k}"] = getattr(layer, k)["default"].shape
    return out


# --------------------------------------------------------------------------------------


RECORDINGS = {
    "peft-bert": lambda d: record_peft("bert", d),
    "peft-llama": lambda d: record_peft("llama", d),
    "peft-gpt2": lambda d: record_peft("gpt2", d),
    "peft-prompt-bert": lambda d: record_prompt_tuning("bert", d),
    "peft-prompt-gpt2": lambda d: record_prompt_tuning("gpt2", d),
    "peft-prompt-llama": lambda d: record_prompt_tuning("llama", d),
    "peft-prefix-gpt2": lambda d: record_prefix_tuning("gpt2", d),
    "peft-prefix-llama": lambda d: record_prefix_tuning("llama", d),
    "prefix-bert": lambda d: record_encoder_prefix("bert", d),
    "prefix-roberta": lambda d: record_encoder_prefix("roberta", d),
    "train-bert": lambda d: record_train("bert", d),
    "train-llama": lambda d: record_train("llama", d),
    "adalora-bert": lambda d: record_adalora("bert", d),
    "adalora-llama": lambda d: record_adalora("llama", d),
}


def arch_of(name: str) -> str:
    """The base model of a recording: the last dash-separated part (peft-prompt-bert -> bert)."""
    return name.rsplit("-", 1)[1]


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    return {"arch": platform.machine(), "cpu": model or platform.processor(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="recording(s) to (re)record; repeatable or comma separated")
    ap.add_argument("--out", type=Path, default=REFS_DIR, help=f"output directory (default {REFS_DIR})")
    ns = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notes from PEFT's loader

    names = [n for o in ns.only for n in o.split(",") if n] or list(RECORDINGS)
    unknown = [n for n in names if n not in RECORDINGS]
    if unknown:
        ap.error(f"unknown recording(s) {unknown}; known: {list(RECORDINGS)}")
    out_root = ns.out.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    manifest_path = out_root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"fixture_rebuild": {}, "recordings": {}}

    # manifest["fixture_rebuild"][arch] describes the machine that recorded the arch's recordings:
    # it is replaced only when this run re-records all of them (or it is missing).  Every
    # recording entry also carries the figures of the run that made it.
    fixture_here = {}
    for arch in sorted({arch_of(n) for n in names}):
        fixture_here[arch] = check_fixture_rebuild(arch)
        print(f"[fixture {arch}] rebuilt torch model vs outputs.npz: {fixture_here[arch]}", flush=True)
        of_arch = [n for n in RECORDINGS if arch_of(n) == arch]
        if arch not in manifest["fixture_rebuild"] or all(n in names for n in of_arch):
            manifest["fixture_rebuild"][arch] = fixture_here[arch]
        elif manifest["fixture_rebuild"][arch] != fixture_here[arch]:
            print(f"[fixture {arch}] note: kept the manifest's fixture_rebuild entry of the earlier run; this machine differs", flush=True)

    for name in names:
        info = RECORDINGS[name](out_root / name)
        info["fixture_rebuild_on_recording_machine"] = fixture_here[arch_of(name)]
        info["recording_machine"] = machine()
        info["bytes"] = tree_bytes(out_root / name)
        manifest["recordings"][name] = info
        brief = {k: v for k, v in info.items() if k != "tensors"}
        print(f"[{name}] {json.dumps(brief)}", flush=True)

    manifest["recordings"] = dict(sorted(manifest["recordings"].items()))
    manifest["fixture_rebuild"] = dict(sorted(manifest["fixture_rebuild"].items()))
    manifest["command"] = "python models/record_references.py"
    manifest["versions"] = versions()
    manifest["ref_seed"] = REF_SEED
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    total = tree_bytes(out_root)
    print(f"references tree: {total / 1024:.1f} KiB in {out_root}")
    if total > MAX_REFS_BYTES:
        print(f"FAILED: references tree is {total} bytes (limit {MAX_REFS_BYTES})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

